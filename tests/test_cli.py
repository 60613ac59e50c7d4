"""The training CLI as a user runs it: --help, and one-line errors (no traceback) for bad input."""
from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

import build_index
import query
import train_embed

from .conftest import ROOT


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train_embed.py"), *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("module", [train_embed, build_index, query])
def test_help_explains_every_flag(module):
    """Every option has help text, and --help (a subprocess, as a user runs it) lists each one."""
    parser = module.build_parser()
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert all(a.help and len(a.help) > 15 for a in options), [a.dest for a in options if not a.help]
    done = subprocess.run([sys.executable, str(ROOT / f"{module.__name__}.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    missing = [a.option_strings[-1] for a in options if a.option_strings[-1] not in done.stdout]
    assert not missing, missing


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("command", [["train_embed.py", "--gallery", "{g}"],
                                     ["build_index.py", "--gallery", "{g}", "--out", "{o}"]])
def test_device_cuda_without_a_gpu_is_one_line(tmp_path, orl_samples, command):
    from .index_helpers import assert_one_line_error, copy_gallery

    gallery = copy_gallery(orl_samples, tmp_path / "g", ["s1", "s2"], per_identity=2)
    args = [a.format(g=gallery, o=tmp_path / "idx") for a in command]
    done = subprocess.run([sys.executable, str(ROOT / args[0]), *args[1:], "--device", "cuda",
                           "--out" if args[0] == "train_embed.py" else "--no-progress",
                           *([str(tmp_path / "run")] if args[0] == "train_embed.py" else [])],
                          capture_output=True, text=True, timeout=300)
    assert_one_line_error(done, "--device cuda: torch sees no CUDA GPU")


@pytest.mark.parametrize("case, message", [
    ("missing_gallery", "gallery folder"),
    ("wrong_columns", "needs ['Image', 'Id']"),
    ("one_identity", "at least 2 identities"),
    ("missing_resume", "checkpoint"),
])
def test_bad_input_is_one_clear_line(tmp_path, orl_samples, case, message):
    args = ["--out", str(tmp_path / "run"), "--epochs", "1", "--image-size", "32", "--workers", "0"]
    if case == "missing_gallery":
        args += ["--gallery", str(tmp_path / "nowhere")]
    elif case == "wrong_columns":
        (tmp_path / "imgs").mkdir()
        pd.DataFrame({"file": ["a.jpg"], "label": ["x"]}).to_csv(tmp_path / "t.csv", index=False)
        args += ["--gallery", str(tmp_path / "imgs"), "--labels", str(tmp_path / "t.csv")]
    elif case == "one_identity":
        person = tmp_path / "g" / "s1"
        person.mkdir(parents=True)
        for sample in [s for s in orl_samples if s.identity == "s1"][:3]:
            (person / sample.path.name).write_bytes(sample.path.read_bytes())
        args += ["--gallery", str(tmp_path / "g")]
    else:
        args += ["--gallery", str(tmp_path), "--resume", str(tmp_path / "nope.pt")]
        (tmp_path / "a").mkdir(); (tmp_path / "b").mkdir()
        for folder, sample in zip("ab", orl_samples[:2]):
            (tmp_path / folder / sample.path.name).write_bytes(sample.path.read_bytes())
    done = run_cli(*args)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    error_lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and message in error_lines[0], done.stderr
