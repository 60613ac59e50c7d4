"""The Kaggle whale submission file: ``Image,Id`` with up to five space-separated labels.

One row per query image, named by its file name (Kaggle's test images sit in one folder), sorted by
name so two runs diff cleanly; ``new_whale`` is already placed in each answer by the threshold.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

from .errors import UserError

HEADER = ("Image", "Id")
KAGGLE_LABELS = 5  # the competition reads at most five labels per image


def submission_rows(answers: Sequence) -> list[tuple[str, str]]:
    """(file name, "id1 id2 ...") per answer (``QueryAnswer``), sorted by file name."""
    rows = sorted((Path(a.image).name, " ".join(a.labels[:KAGGLE_LABELS])) for a in answers)
    names = [name for name, _ in rows]
    if len(set(names)) != len(names):
        raise UserError("two query images share a file name: a submission names each image once; "
                        "query one folder at a time")
    return rows


def write_submission(path: str | Path, answers: Sequence) -> int:
    """Write the file atomically; returns the number of rows."""
    from .checkpoint import atomic_write

    rows = submission_rows(answers)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(HEADER)
    writer.writerows(rows)
    atomic_write(path, lambda temp: temp.write_text(buffer.getvalue()))
    return len(rows)


def read_labels_csv(path: str | Path, what: str) -> dict[str, list[str]]:
    """``Image,Id`` rows as {image: labels}; ``Id`` may hold several space-separated labels."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    table = pd.read_csv(path, dtype=str).fillna("")
    if list(table.columns[:2]) != list(HEADER):
        raise UserError(f"{what} {path} has columns {list(table.columns)}; expected 'Image,Id'")
    return {image: labels.split() for image, labels in zip(table["Image"], table["Id"])}


def score_submission(submission: str | Path, truth: str | Path) -> float:
    """MAP@5 of a submission file against a truth file (one true ``Id`` per image)."""
    from .metrics import map_at_k

    answers = read_labels_csv(submission, "submission")
    truths = read_labels_csv(truth, "truth file")
    missing = sorted(set(truths) - set(answers))
    if missing:
        raise UserError(f"the submission has no row for {len(missing)} image(s) of the truth file, "
                        f"e.g. {missing[0]}: query every image")
    images = sorted(truths)
    return map_at_k([answers[i] for i in images], [truths[i][0] for i in images], KAGGLE_LABELS)


def _main() -> None:
    """``python -m retrieval.submission SUBMISSION TRUTH``: print MAP@5."""
    import argparse

    parser = argparse.ArgumentParser(description="Score a Kaggle whale submission (MAP@5).")
    parser.add_argument("submission", help="CSV written by query.py --submission")
    parser.add_argument("truth", help="CSV Image,Id with the true identity (or new_whale) per image")
    args = parser.parse_args()
    print(f"MAP@5 {score_submission(args.submission, args.truth):.4f}")


if __name__ == "__main__":
    from .errors import run_cli

    run_cli(_main)
