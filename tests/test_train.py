"""Training on real data: the loss falls, MAP@5 beats the references, checkpoints are safe,
resuming works, and torchrun/DDP runs with 2 CPU processes."""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from retrieval import protocol
from retrieval.checkpoint import load_checkpoint, load_model, save_checkpoint
from retrieval.errors import UserError
from retrieval.submission import score_submission
from retrieval.train import TrainConfig, Trainer, train

from .conftest import OMNIGLOT, ROOT
from .index_helpers import make_checkpoint

TINY = dict(image_size=48, embedding_dim=64, batch_size=16, num_workers=0, warmup_epochs=1)


def read_log(out: Path) -> list[dict]:
    with (out / "log.csv").open() as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def orl_subset(orl_samples):
    """Ten people, all ten photos each."""
    keep = {f"s{i}" for i in range(1, 11)}
    return [s for s in orl_samples if s.identity in keep]


def test_short_training_on_omniglot_beats_both_references(omniglot_samples, tmp_path):
    """The whale protocol on real data, seed 0: a short CPU run must beat the constant new_whale
    answer and the untrained pretrained backbone + GeM (even with its oracle threshold)."""
    config = TrainConfig(out=str(tmp_path), image_size=96, num_workers=0)  # the README's run
    result = protocol.run_seed(config, omniglot_samples, seed=0, data_root=OMNIGLOT)
    rows = read_log(tmp_path / "seed0")
    losses = [float(r["train_loss"]) for r in rows if r["stage"] == "select"]
    assert min(losses[-3:]) < losses[0] * 0.8, losses
    assert result["constant_new_whale"] == pytest.approx(0.25)
    assert result["engine"] > result["constant_new_whale"]
    assert result["engine"] > result["pretrained_gem"], result
    assert result["engine"] > result["pretrained_gem_oracle_threshold"], result
    replay_as_a_user(tmp_path / "seed0", result)


def replay_as_a_user(run: Path, result: dict) -> None:
    """The README chain on the exported split: build_index.py, query.py --submission, then the
    scorer must give exactly the protocol's MAP@5 (one search path, one stored threshold)."""
    truth = pd.read_csv(run / "queries_truth.csv")
    assert len(truth) == 136 and (truth["Id"] == "new_whale").sum() == 34
    assert len(pd.read_csv(run / "gallery.csv")) == result["gallery_images"]
    python = [sys.executable]
    for command in (
        [str(ROOT / "build_index.py"), "--gallery", str(OMNIGLOT), "--labels",
         str(run / "gallery.csv"), "--model", str(run / "model.pt"), "--out", str(run / "index")],
        [str(ROOT / "query.py"), str(run / "queries"), "--index", str(run / "index"),
         "--submission", str(run / "submission.csv")],
    ):
        done = subprocess.run(python + command, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    assert score_submission(run / "submission.csv", run / "queries_truth.csv") == \
        pytest.approx(result["engine"])


def test_checkpoint_rebuilds_model_and_preprocessing(orl_subset, tmp_path):
    path = train(TrainConfig(out=str(tmp_path), epochs=2, refit=False, **TINY), orl_subset)
    model, pre, payload = load_model(path)
    assert pre.image_size == 48 and pre.mean == (0.5, 0.5, 0.5)
    assert payload["threshold"] is not None
    assert len(payload["identities"]) == 8  # 2 of 10 people held back as pseudo-new
    x = torch.randn(2, 3, 48, 48)
    trained = load_checkpoint(tmp_path / "best.pt")
    assert payload["fingerprint"] == trained["fingerprint"]
    assert model(x).shape == (2, 64)


@pytest.mark.parametrize("loss,workers", [("arcface", 0), ("triplet", 2)])
def test_same_seed_trains_the_same_weights(orl_subset, tmp_path, loss, workers):
    """Augmentation (albumentations' own RNG, per DataLoader worker), pml's sampler (global
    NumPy) and torch are all seeded: one seed, one model; another seed, another model."""
    def fingerprint(seed: int, name: str) -> str:
        config = TrainConfig(out=str(tmp_path / name), epochs=2, refit=False, seed=seed, loss=loss,
                             **{**TINY, "num_workers": workers})
        return load_checkpoint(train(config, orl_subset))["fingerprint"]

    first = fingerprint(0, "a")
    assert fingerprint(0, "b") == first
    assert fingerprint(1, "c") != first


def test_resume_continues_where_the_run_stopped(orl_subset, tmp_path, monkeypatch):
    config = TrainConfig(out=str(tmp_path), epochs=3, refit=False, **TINY)
    original = Trainer.train_epoch

    def crash_in_third_epoch(self):
        if self.epoch == 2:
            raise KeyboardInterrupt("simulated crash")
        return original(self)

    monkeypatch.setattr(Trainer, "train_epoch", crash_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(config, orl_subset)
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 2
    monkeypatch.setattr(Trainer, "train_epoch", original)
    train(config, orl_subset, resume=tmp_path / "last.pt")
    epochs = [int(r["epoch"]) for r in read_log(tmp_path)]
    assert epochs == [1, 2, 3]  # no epoch trained twice
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 3
    assert (tmp_path / "model.pt").is_file()


def test_interrupted_checkpoint_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = make_checkpoint(tmp_path / "model.pt", seed=0)
    before = load_checkpoint(path)["fingerprint"]

    def failing_save(obj, target):
        Path(target).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError):
        make_checkpoint(path, seed=1)
    monkeypatch.undo()
    assert load_checkpoint(path)["fingerprint"] == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temp file left behind


def test_corrupt_or_foreign_checkpoint_is_a_clear_error(tmp_path):
    truncated = tmp_path / "truncated.pt"
    save_checkpoint(truncated, {"state_dict": {"w": torch.zeros(1000)}})
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": 1}, foreign)
    with pytest.raises(UserError, match="not a checkpoint of this project"):
        load_checkpoint(foreign)
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.pt")


@pytest.mark.parametrize("loss", ["subcenter-arcface", "triplet", "multi-similarity"])
def test_every_loss_trains(orl_subset, tmp_path, loss):
    config = TrainConfig(out=str(tmp_path), epochs=2, refit=False, loss=loss, **TINY)
    model, _, payload = load_model(train(config, orl_subset))
    losses = [float(r["train_loss"]) for r in read_log(tmp_path)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert payload["train_config"]["loss"] == loss


def _copy_identities(samples, root: Path) -> Path:
    for sample in samples:
        target = root / sample.identity / sample.path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sample.path, target)
    return root


def test_torchrun_two_cpu_processes(orl_subset, tmp_path):
    gallery = _copy_identities(orl_subset, tmp_path / "gallery")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--master_port=29731", str(ROOT / "train_embed.py"), "--gallery", str(gallery),
               "--out", str(out), "--epochs", "2", "--warmup-epochs", "1", "--image-size", "48",
               "--embedding-dim", "64", "--batch-size", "8", "--workers", "0", "--device", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_log(out)
    assert [r["stage"] for r in rows] == ["select", "select", "refit", "refit"]  # rank 0 logs once
    model, pre, payload = load_model(out / "model.pt")
    assert payload["train_config"]["batch_size"] == 8 and pre.image_size == 48
