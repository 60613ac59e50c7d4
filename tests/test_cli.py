"""The training CLI as a user runs it: --help, and one-line errors (no traceback) for bad input."""
from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from .conftest import ROOT


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train_embed.py"), *args],
                          capture_output=True, text=True, timeout=300)


def test_help_explains_every_flag():
    done = run_cli("--help")
    assert done.returncode == 0
    for flag in ("--gallery", "--labels", "--whale-protocol", "--backbone", "--loss", "--resume",
                 "--image-size", "--flip", "--no-refit", "--strict"):
        assert flag in done.stdout


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
