"""Who is in this photo? Rank a gallery index's identities for one image or a folder of images.

  python query.py photo.jpg --index runs/index                  # ranked identities, similarity,
                                                                # nearest gallery image of each
  python query.py test/ --submission submission.csv             # Kaggle file (Image,Id)
  python query.py test/ --json > answers.json
  python query.py test/ --html report.html                      # thumbnails, self-contained
  python query.py test/ --truth truth.csv --metrics scores.json # score labelled queries
  python query.py val/                                          # val/<identity>/<image>: scored too

The model, preprocessing, TTA and new_whale threshold come from the index (build_index.py).
"""
from __future__ import annotations

import argparse
import json
import sys

from retrieval.cli import add_index_argument, add_model_argument
from retrieval.errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("query", metavar="IMG|DIR", help="an image, or a folder whose images are all queried")
    p.add_argument("-k", type=int, default=5,
                   help="identities per answer, new_whale included (default %(default)s; at most "
                        "the index's identities + 1)")
    add_index_argument(p)
    p.add_argument("--threshold", type=float,
                   help="new_whale goes before the first identity scoring under this similarity "
                        "(default: the threshold stored in the index, from its checkpoint)")
    add_model_argument(p)
    p.add_argument("--truth", metavar="CSV",
                   help="score the answers: a CSV Image,Id with each query image's true identity "
                        "(by file name; new_whale for someone not in the gallery). A query folder "
                        "holding one sub-folder per identity is scored without it")
    out = p.add_argument_group("output (default: text on stdout)")
    out.add_argument("--json", action="store_true", help="print the answers as JSON on stdout")
    out.add_argument("--submission", metavar="CSV",
                     help="write a Kaggle submission: header Image,Id, one row per query image "
                          "sorted by name, space-separated labels")
    out.add_argument("--html", metavar="FILE",
                     help="write a self-contained HTML page: each query beside its top-k gallery "
                          "thumbnails, identities and similarities (with a truth: right answers "
                          "marked, scores at the top)")
    out.add_argument("--heatmaps", action="store_true",
                     help="with --html: a 'why?' toggle per match showing where the query and the "
                          "gallery image found each other (loads the full model; first 100 queries)")
    out.add_argument("--metrics", metavar="JSON",
                     help="with a truth: write MAP@5, top-1/top-5 accuracy, macro-F1 and the "
                          "per-identity table as JSON")
    run = p.add_argument_group("run")
    run.add_argument("--strict", action="store_true",
                     help="with a folder: fail on an unreadable image instead of leaving it out of "
                          "the outputs with a warning (a single image must always be readable)")
    run.add_argument("--batch-size", type=int, default=64, help="images per batch (default %(default)s)")
    run.add_argument("--workers", type=int,
                     help="DataLoader worker processes (default: none for one batch or on a "
                          "machine of 2 cores or fewer, else up to 4)")
    run.add_argument("--device", choices=["cpu", "cuda"],
                     help="force a device (default: cuda when available)")
    return p


def main() -> int:
    args = build_parser().parse_args()
    from retrieval.answering.query import check_output_options, format_text, run_query, to_json

    check_output_options(args.query, args.truth, args.metrics, args.heatmaps, args.html)

    result = run_query(args.query, args.index, k=args.k, threshold=args.threshold, model=args.model,
                       batch_size=args.batch_size, workers=args.workers, device=args.device,
                       strict=args.strict, truth=args.truth)
    if args.metrics:
        from retrieval.answering.query import write_metrics

        write_metrics(args.metrics, result)
        print(f"wrote {args.metrics}", file=sys.stderr)
    if args.submission:
        from retrieval.answering.submission import write_submission
        rows = write_submission(args.submission, result.answers)
        print(f"wrote {rows} rows to {args.submission}", file=sys.stderr)
    if args.html:
        from retrieval.answering.report import write_report

        explain = None
        if args.heatmaps:
            from retrieval.answering.heatmap import index_explainer

            explain = index_explainer(args.index, args.model)
        write_report(args.html, result, explain)
        print(f"wrote {args.html}", file=sys.stderr)
    if args.json:
        print(json.dumps(to_json(result), indent=2))
    elif not (args.submission or args.html or args.metrics):
        print(format_text(result))
    elif result.evaluation is not None:
        from retrieval.metrics import format_evaluation

        print(format_evaluation(result.evaluation, result.truth_source, per_identity=False),
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
