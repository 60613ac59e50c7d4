"""Audit a gallery index: near-duplicate photos, photos probably under the wrong identity, and
outliers of their identity, ranked most suspicious first. Changes nothing.

  python audit.py --index runs/index --out runs/audit     # audit.csv + audit.html (thumbnails)

Uses the vectors stored in the index (nothing is re-embedded); the duplicate check decodes small
thumbnails of the candidate pairs' images.
"""
from __future__ import annotations

import argparse
import logging

from retrieval.cli import add_index_argument
from retrieval.errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    from retrieval.answering.audit import DUPLICATE_CORRELATION, OUTLIER_MADS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_index_argument(p)
    p.add_argument("--out", default="runs/audit",
                   help="folder for audit.csv and audit.html (default %(default)s)")
    p.add_argument("--duplicate-correlation", type=float, default=DUPLICATE_CORRELATION,
                   help="pixel correlation of two neighbours' 32x32 grey thumbnails from which "
                        "they count as the same photo (default %(default)s)")
    p.add_argument("--outlier-mads", type=float, default=OUTLIER_MADS,
                   help="an image is an outlier when its mean similarity to its identity is this "
                        "many median absolute deviations below the identity's median "
                        "(default %(default)s)")
    return p


def main() -> int:
    args = build_parser().parse_args()
    from index.store import load_index
    from retrieval.answering.audit import audit_gallery, write_audit

    stored = load_index(args.index, backends=("faiss",))
    findings = audit_gallery(stored.embeddings(), stored.paths, stored.identities,
                             args.duplicate_correlation, args.outlier_mads)
    csv_path, page = write_audit(args.out, findings, str(args.index))
    counts = {kind: sum(f.kind == kind for f in findings) for kind in ("duplicate", "mislabel", "outlier")}
    logging.getLogger(__name__).info(
        "%d images of %d identities: %d near-duplicate pair(s), %d probably mislabelled, %d "
        "outlier(s); wrote %s and %s", len(stored.paths), len(set(stored.identities)),
        counts["duplicate"], counts["mislabel"], counts["outlier"], csv_path, page)
    return 0


if __name__ == "__main__":
    run_cli(main)
