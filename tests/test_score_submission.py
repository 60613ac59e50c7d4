"""Scoring a Kaggle submission file against the truth, as the README's last step does."""
import subprocess
import sys

import pytest

from retrieval.answering.submission import score_submission
from retrieval.errors import UserError

from .conftest import ROOT


def write(path, text):
    path.write_text(text)
    return path


def test_score_matches_hand_computed_map5(tmp_path):
    submission = write(tmp_path / "s.csv", "Image,Id\na.jpg,w1 new_whale w2\nb.jpg,new_whale w1\n"
                                           "c.jpg,w3 w4 w5 w6 new_whale\n")
    truth = write(tmp_path / "t.csv", "Image,Id\na.jpg,w1\nb.jpg,w1\nc.jpg,new_whale\n")
    assert score_submission(submission, truth) == pytest.approx((1 + 0.5 + 0.2) / 3)


def test_missing_rows_and_wrong_header_are_clear_errors(tmp_path):
    truth = write(tmp_path / "t.csv", "Image,Id\na.jpg,w1\nb.jpg,w2\n")
    with pytest.raises(UserError, match="no row for 1 image"):
        score_submission(write(tmp_path / "s.csv", "Image,Id\na.jpg,w1\n"), truth)
    with pytest.raises(UserError, match="expected 'Image,Id'"):
        score_submission(write(tmp_path / "bad.csv", "file,label\na.jpg,w1\n"), truth)


def test_module_cli_prints_map5(tmp_path):
    submission = write(tmp_path / "s.csv", "Image,Id\na.jpg,w2 w1\n")
    truth = write(tmp_path / "t.csv", "Image,Id\na.jpg,w1\n")
    done = subprocess.run([sys.executable, "-m", "retrieval.answering.submission", str(submission), str(truth)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0 and done.stdout.splitlines()[0] == "MAP@5 0.5000"
    assert "top-1 0.0000   top-5 1.0000" in done.stdout
