"""Checkpoints are files people share: loading one must never run code, a damaged or edited one
is one clear line, and written files get the permissions the user's umask asks for."""
from __future__ import annotations

import json
import os
import pickle
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval.errors import UserError
from retrieval.files import atomic_write
from retrieval.models.checkpoint import (
    FORMAT,
    load_checkpoint,
    load_model,
    save_checkpoint,
    state_fingerprint,
)

from .index_helpers import assert_one_line_error, copy_gallery, make_checkpoint, run_cli


class RunsCode:
    """Unpickling this runs a shell command: what a malicious model.pt carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def evil_checkpoint(path: Path, marker: Path, real: Path | None = None) -> Path:
    """A file that looks like this project's checkpoint (right format tag, and a real model's
    keys when ``real`` is given) but runs ``touch marker`` when unpickled unsafely."""
    payload = dict(torch.load(real, weights_only=True)) if real else {"format": FORMAT}
    payload["metrics"] = {"val_map5": RunsCode(marker)}
    torch.save(payload, path)
    return path


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", seed=0)


def test_the_crafted_file_really_runs_code_when_unpickled_unsafely(tmp_path):
    """Guards the tests below: they mean something only if the crafted file is a real attack."""
    path = evil_checkpoint(tmp_path / "model.pt", tmp_path / "marker")
    torch.load(path, weights_only=False)
    assert (tmp_path / "marker").exists()


@pytest.mark.parametrize("writer", ["torch.save", "plain pickle"])
def test_a_code_running_checkpoint_is_refused_and_runs_nothing(tmp_path, real_checkpoint, writer):
    marker = tmp_path / "marker"
    path = tmp_path / "model.pt"
    if writer == "torch.save":
        evil_checkpoint(path, marker, real_checkpoint)
    else:  # the legacy, non-zip format
        path.write_bytes(pickle.dumps({"format": FORMAT, "x": RunsCode(marker)}, protocol=2))
    with pytest.raises(UserError, match="was refused: it holds Python objects .*GLOBAL posix.system") as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_no_cli_runs_code_from_a_received_model_or_index(tmp_path, real_checkpoint, orl_samples):
    """build_index.py --model, train_embed.py --resume, and a plain query.py on an index whose
    manifest names a checkpoint that has since been swapped for a malicious one."""
    marker = tmp_path / "marker"
    evil = evil_checkpoint(tmp_path / "evil.pt", marker, real_checkpoint)
    gallery = copy_gallery(orl_samples, tmp_path / "gallery", ["s1", "s2"], per_identity=2)
    assert_one_line_error(run_cli("build_index.py", "--gallery", gallery, "--model", evil,
                                  "--out", tmp_path / "idx"), "was refused")
    assert_one_line_error(run_cli("train_embed.py", "--gallery", gallery, "--resume", evil,
                                  "--out", tmp_path / "run", "--workers", "0"), "was refused")
    assert_one_line_error(run_cli("train_embed.py", "--gallery", gallery, "--resume", real_checkpoint,
                                  "--out", tmp_path / "run", "--workers", "0"),
                          "cannot be resumed", "pass the run's last.pt")
    shared = tmp_path / "shared.pt"
    shared.write_bytes(real_checkpoint.read_bytes())
    built = run_cli("build_index.py", "--gallery", gallery, "--model", shared, "--out", tmp_path / "idx")
    assert built.returncode == 0, built.stderr[-2000:]
    shared.write_bytes(evil.read_bytes())  # the index now points at a malicious file
    query = next((gallery / "s1").iterdir())
    # a plain query runs the index's exported ONNX encoder and never opens the checkpoint; made
    # to load the checkpoint, it refuses the malicious file
    answered = run_cli("query.py", query, "--index", tmp_path / "idx")
    assert answered.returncode == 0 and "s1" in answered.stdout, answered.stderr[-2000:]
    assert_one_line_error(run_cli("query.py", query, "--index", tmp_path / "idx", "--model", shared),
                          "was refused")
    assert not marker.exists()


def payload_of(path: Path) -> dict:
    return dict(torch.load(path, weights_only=True))


@pytest.mark.parametrize("edit, expected", [
    (lambda p: p.pop("model_config"), "no 'model_config'"),
    (lambda p: p.pop("state_dict"), "no 'state_dict'"),
    (lambda p: p.update(threshold="0.5"), "'threshold' is a str"),
    (lambda p: p["model_config"].update(embedding_dim=10**9), "model_config.embedding_dim"),
    (lambda p: p["preprocessing"].update(image_size="big"), "preprocessing.image_size"),
    (lambda p: p["state_dict"].update({"neck.0.weight": torch.zeros(3, 3)}),
     "do not match their recorded fingerprint"),
])
def test_a_damaged_or_edited_checkpoint_is_one_clear_line(tmp_path, real_checkpoint, edit, expected):
    payload = payload_of(real_checkpoint)
    payload["model_config"] = dict(payload["model_config"])
    payload["preprocessing"] = dict(payload["preprocessing"])
    payload["state_dict"] = dict(payload["state_dict"])
    edit(payload)
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(UserError) as err:
        load_model(tmp_path / "edited.pt")
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_weights_that_do_not_fit_the_architecture_are_one_clear_line(tmp_path, real_checkpoint):
    """Right tag, consistent fingerprint, but weights of another shape: no load_state_dict trace."""
    payload = payload_of(real_checkpoint)
    state = dict(payload["state_dict"])
    state["neck.0.weight"] = torch.zeros(16, 1280)
    payload.update(state_dict=state, fingerprint=state_fingerprint(state))
    torch.save(payload, tmp_path / "reshaped.pt")
    with pytest.raises(UserError, match="weights do not fit a tf_efficientnet_lite0 of embedding size 32"):
        load_model(tmp_path / "reshaped.pt")


def test_checkpoints_of_earlier_versions_still_load(tmp_path, real_checkpoint):
    """Earlier versions wrote the same plain payload with torch.save; it loads as before."""
    torch.save(payload_of(real_checkpoint), tmp_path / "old.pt")
    model, preprocessing, payload = load_model(tmp_path / "old.pt")
    assert preprocessing.image_size == 64 and model.embedding_dim == 32
    assert payload["fingerprint"] == state_fingerprint(model.state_dict())


def test_saving_refuses_what_could_not_be_loaded_safely(tmp_path):
    with pytest.raises(TypeError, match=r"payload\['metrics'\]\['map5'\] is a float64"):
        save_checkpoint(tmp_path / "x.pt", {"metrics": {"map5": np.float64(0.5)}})
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    """Issue 12 item 9: outputs were 0600 whatever the umask (mkstemp's private mode)."""
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "report.html", lambda temp: temp.write_text("<html></html>"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "report.html").stat().st_mode) == mode


def test_index_files_follow_the_umask(tmp_path):
    from index.store import read_manifest, save_index

    vectors = np.eye(4, 8, dtype=np.float32)
    model = {"fingerprint": "abc", "source": "pretrained", "checkpoint": None}
    old = os.umask(0o022)
    try:
        save_index(tmp_path / "idx", vectors, [f"/g/{i}.png" for i in range(4)], list("abcd"),
                   model=model, tta="none", threshold=None)
    finally:
        os.umask(old)
    folder = tmp_path / "idx"
    data = folder / read_manifest(folder).data_dir
    for path in [folder, folder / "manifest.json", data, *data.iterdir()]:
        expected = 0o755 if path.is_dir() else 0o644
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
    json.loads((folder / "manifest.json").read_text())
