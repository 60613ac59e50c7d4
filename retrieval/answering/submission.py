"""The Kaggle whale submission file: ``Image,Id`` with up to five space-separated labels.

One row per query image, named by its file name (Kaggle's test images sit in one folder), sorted by
name so two runs diff cleanly; ``new_whale`` is already placed in each answer by the threshold.

The file is opened in spreadsheets as often as it is uploaded, so no cell may start a formula:
identities are checked (``retrieval.data.check_identities``) and a query file name starting with
= + - @ (or a tab / carriage return) is written behind a single quote, which ``read_labels_csv``
removes again.
"""
from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Sequence

from ..errors import UserError

log = logging.getLogger(__name__)

HEADER = ("Image", "Id")
KAGGLE_LABELS = 5  # the competition reads at most five labels per image
FORMULA_CELL_START = ("=", "+", "-", "@", "\t", "\r")  # what spreadsheets treat as a formula
ESCAPE = "'"  # spreadsheets show a cell starting with it as text, without the quote


def submission_rows(answers: Sequence) -> list[tuple[str, str]]:
    """(file name, "id1 id2 ...") per answer (``QueryAnswer``), sorted by file name."""
    from ..data import check_identities

    check_identities((label for a in answers for label in a.labels[:KAGGLE_LABELS]), "the index",
                     "rename it in the gallery and rebuild the index with build_index.py")
    cells = _escape_names([Path(a.image).name for a in answers])
    if len(set(cells)) != len(cells):
        raise UserError("two query images share a file name: a submission names each image once; "
                        "query one folder at a time")
    return sorted((cell, " ".join(a.labels[:KAGGLE_LABELS])) for cell, a in zip(cells, answers))


def _escape_names(names: Sequence[str]) -> list[str]:
    """Each name, behind a single quote where it would start a spreadsheet formula (a warning
    says how many: Kaggle will not match such rows to its own file names)."""
    risky = [name for name in names if name.startswith(FORMULA_CELL_START)]
    if risky:
        log.warning("%d query file name(s) start like a spreadsheet formula (e.g. %r): written as "
                    "%r in the submission; rename the files to match Kaggle's names", len(risky),
                    risky[0], ESCAPE + risky[0])
    return [ESCAPE + name if name.startswith(FORMULA_CELL_START) else name for name in names]


def _unescape(name: str) -> str:
    """A file name as ``_escape_names`` found it."""
    return name[1:] if name.startswith(ESCAPE) and name[1:].startswith(FORMULA_CELL_START) else name


def write_submission(path: str | Path, answers: Sequence) -> int:
    """Write the file atomically; returns the number of rows."""
    from ..files import atomic_write

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
    return {_unescape(image): labels.split() for image, labels in zip(table["Image"], table["Id"])}


def score_submission(submission: str | Path, truth: str | Path) -> float:
    """MAP@5 of a submission file against a truth file (one true ``Id`` per image)."""
    return evaluate_submission(submission, truth).map5


def evaluate_submission(submission: str | Path, truth: str | Path):
    """Every metric (``metrics.evaluate_answers``, as ``query.py --truth`` prints them) of a
    submission file against a truth file."""
    from ..metrics import evaluate_answers

    answers = read_labels_csv(submission, "submission")
    truths = read_labels_csv(truth, "truth file")
    missing = sorted(set(truths) - set(answers))
    if missing:
        raise UserError(f"the submission has no row for {len(missing)} image(s) of the truth file, "
                        f"e.g. {missing[0]}: query every image")
    images = sorted(truths)
    return evaluate_answers([answers[i] for i in images], [truths[i][0] for i in images],
                            KAGGLE_LABELS)


def _main() -> None:
    """``python -m retrieval.answering.submission SUBMISSION TRUTH``: print MAP@5 and the other metrics."""
    import argparse

    from ..metrics import format_evaluation

    parser = argparse.ArgumentParser(description="Score a Kaggle whale submission (MAP@5, top-1 / "
                                                 "top-5 accuracy, macro-F1, per identity).")
    parser.add_argument("submission", help="CSV written by query.py --submission")
    parser.add_argument("truth", help="CSV Image,Id with the true identity (or new_whale) per image")
    parser.add_argument("--per-identity", action="store_true", help="also print the per-identity table")
    args = parser.parse_args()
    evaluation = evaluate_submission(args.submission, args.truth)
    print(f"MAP@5 {evaluation.map5:.4f}")
    print(format_evaluation(evaluation, args.truth, per_identity=args.per_identity))


if __name__ == "__main__":
    from ..errors import run_cli

    run_cli(_main)
