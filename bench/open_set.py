"""Open-set retrieval protocol: Recall@1 and MAP@R on identities never seen in training.

  python -m bench open-set --data omniglot --epochs 5 --seeds 0

``retrieval.data.open_set_split``: the first half of the sorted identities trains (through
``retrieval.training.train.train``, the code users run), the second half is the test set: every test image
is a query against all the other test images. Recall@1 (= precision_at_1) and MAP@R come from
pytorch-metric-learning's ``AccuracyCalculator`` (k="max_bin_count", reference = query set with
the query itself excluded: ``ref_includes_query=True``). ``--seeds`` are training seeds: the split
itself has no randomness.

The engine row trains with the engine's real recipe, exactly what ``train_embed.py`` runs with its
defaults: selection on a validation carve-out, then the refit on all training images (``--no-refit``
scores the selection model instead, about half the CPU time). The peers get no frozen warm-up and a
constant learning rate (``bench.peers.peer_recipe``), as a plain setup trains, and the engine's
measured training time (refit and validation included) as their budget.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import Report, data_path, format_table, label_array, mean_std, pm, suite_config
from .peers import PEERS, engine_train_seconds, train_peer

LOSSES = ("arcface", "subcenter-arcface", "triplet", "multi-similarity")
METRICS = {"precision_at_1": "Recall@1", "mean_average_precision_at_r": "MAP@R"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="omniglot", help="omniglot | orl | a folder-per-identity path")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--epochs", type=int, default=5, help="selection-stage epochs")
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    p.add_argument("--no-refit", dest="refit", action="store_false",
                   help="score the selection model without the refit (the engine's default is to "
                        "refit; see above)")
    p.add_argument("--no-softmax", dest="softmax", action="store_false",
                   help="skip the softmax-classifier baseline (its GeM features as the embedding)")
    p.add_argument("--peers", nargs="*", default=list(PEERS), choices=list(PEERS),
                   help="peer libraries, trained for the engine's ArcFace time (default both)")
    p.add_argument("--backbone", default=None)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--workdir", help="where checkpoints go (default: a temp dir, deleted after)")


def open_set_metrics(vectors: np.ndarray, test) -> dict[str, float]:
    """Recall@1 and MAP@R of every vector (the embeddings of the ``test`` samples, in order)
    against all the others (self excluded)."""
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    labels = label_array([s.identity for s in test])
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    calculator = AccuracyCalculator(include=tuple(METRICS), k="max_bin_count", device=None)
    result = calculator.get_accuracy(vectors, labels, vectors, labels, ref_includes_query=True)
    return {key: float(result[key]) for key in METRICS}


def evaluate_checkpoint(checkpoint, test) -> dict[str, float]:
    from retrieval.models.checkpoint import load_model
    from retrieval.models.embed import embed_images

    model, preprocessing, _ = load_model(checkpoint)
    vectors = embed_images(model, [s.path for s in test], preprocessing, progress=False)
    return open_set_metrics(vectors, test)


def pretrained_metrics(args, test) -> dict[str, float]:
    from retrieval.models.embed import embed_images
    from retrieval.config import DEFAULT_BACKBONE
    from retrieval.models.model import preprocessing_for, zero_shot_model

    model = zero_shot_model(args.backbone or DEFAULT_BACKBONE)
    vectors = embed_images(model, [s.path for s in test], preprocessing_for(model, args.image_size),
                           progress=False)
    return open_set_metrics(vectors, test)


def run(args) -> dict:
    from retrieval.data import open_set_split, read_folder_gallery
    from retrieval.training.train import train

    samples = read_folder_gallery(data_path(args.data))
    train_samples, test = open_set_split(samples)
    report = Report("open_set", args, args.seeds)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-openset-"))
    rows: dict[str, list[dict]] = {"pretrained + GeM (no fine-tuning)": [pretrained_metrics(args, test)]}
    budgets: dict[int, float | None] = {}
    try:
        for loss in args.losses:
            for seed in args.seeds:
                out = workdir / f"{loss}-{seed}"
                started = time.perf_counter()
                try:
                    checkpoint = train(suite_config(args, loss, seed, out), train_samples)
                except Exception as err:  # record it, go on with the other losses
                    message = f"{type(err).__name__}: {err}"
                    rows.setdefault(f"engine {loss}", []).append({"seed": seed, "error": message})
                    print(f"{loss} seed {seed}: FAILED {message}", flush=True)
                    shutil.rmtree(out, ignore_errors=True)
                    continue
                seconds = time.perf_counter() - started
                metrics = {**evaluate_checkpoint(checkpoint, test), "seed": seed,
                           "train_seconds": round(seconds, 1)}
                if loss == "arcface":
                    budgets[seed] = engine_train_seconds(checkpoint)
                rows.setdefault(f"engine {loss}", []).append(metrics)
                print(f"{loss} seed {seed}: Recall@1 {metrics['precision_at_1']:.3f} "
                      f"MAP@R {metrics['mean_average_precision_at_r']:.3f} ({seconds:.0f}s training)",
                      flush=True)
                shutil.rmtree(out, ignore_errors=True)
                _write(report, args, rows, train_samples, test)
        for seed in args.seeds:
            if args.softmax:
                rows.setdefault("softmax classifier (its GeM features)", []).append(
                    _softmax_metrics(args, seed, train_samples, test, workdir))
            for peer in args.peers:
                rows.setdefault(PEERS[peer], []).append(
                    peer_metrics(args, peer, seed, budgets.get(seed), train_samples, test))
            _write(report, args, rows, train_samples, test)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    summary, table = _write(report, args, rows, train_samples, test)
    print(table)
    return {"rows": rows, "summary": summary}


def _softmax_metrics(args, seed: int, train_samples, test, workdir: Path) -> dict:
    from retrieval.models.embed import embed_images

    from .baselines import train_softmax_classifier

    trained = train_softmax_classifier(suite_config(args, "arcface", seed, workdir), train_samples)
    vectors = embed_images(trained.model, [s.path for s in test], trained.preprocessing,
                           progress=False)
    metrics = {**open_set_metrics(vectors, test), "seed": seed,
               "train_seconds": round(trained.train_seconds, 1)}
    print(f"softmax seed {seed}: {metrics}", flush=True)
    return metrics


def peer_metrics(args, peer: str, seed: int, budget: float | None, train_samples, test) -> dict:
    """Train one peer on ``train_samples`` for ``budget`` s; its Recall@1 / MAP@R on ``test``
    (or an ``error`` saying why it did not run)."""
    if not budget:
        return {"seed": seed, "error": "no engine arcface run this seed to take the time budget from"}
    vectors, stats = train_peer(peer, train_samples, [s.path for s in test], args.image_size, seed,
                                budget, args.workers, getattr(args, "threads", 1),
                                [s.identity for s in test], device=getattr(args, "device", None))
    if vectors is None:
        return {"seed": seed, "error": f"not run: {stats['not_run']}"}
    metrics = {**open_set_metrics(vectors, test), **stats, "seed": seed, "budget_s": budget}
    print(f"{peer} seed {seed}: {metrics}", flush=True)
    return metrics


def _write(report, args, rows, train_samples, test):
    summary = {name: {key: mean_std([r[key] for r in runs if key in r])
                      for key in list(METRICS) + ["train_seconds"] if any(key in r for r in runs)}
               for name, runs in rows.items()}
    headers = ["open-set (test half, query vs rest)", "Recall@1", "MAP@R", "train s", "runs"]
    table_rows = [[name, pm(s.get("precision_at_1")), pm(s.get("mean_average_precision_at_r")),
                   f"{s['train_seconds']['mean']:.0f}" if "train_seconds" in s else "-",
                   s["precision_at_1"]["n"] if "precision_at_1" in s else 0]
                  for name, s in summary.items()]
    failures = sorted({f"{name}: {r['error']}" for name, runs in rows.items() for r in runs
                       if "error" in r})
    title = (f"{args.data}: train {len({s.identity for s in train_samples})} identities / "
             f"{len(train_samples)} images, test {len({s.identity for s in test})} identities / "
             f"{len(test)} images; image {args.image_size}px, {args.epochs} epochs, "
             f"refit={args.refit}, seeds {' '.join(map(str, args.seeds))}")
    table = format_table(headers, table_rows, title)
    table += "".join(f"\nFAILED {f}" for f in failures)
    report.write(f"open_set_{Path(str(args.data)).name}_{args.image_size}px_{args.epochs}ep", getattr(args, "out", None),
                 data=str(args.data), train_images=len(train_samples), test_images=len(test),
                 runs=rows, summary=summary, table=table)
    return summary, table
