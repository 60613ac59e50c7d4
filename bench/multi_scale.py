"""Multi-scale zero-shot features: the untrained backbone + GeM at two image sizes, the two
L2-normalised vectors concatenated with weight w on the first (``[√w·a, √(1-w)·b]``, unit norm
again), calibrated as the zero-shot index calibrates its gallery (leave-one-out threshold,
hubness weight, whitening where it wins; no local matching), on the whale protocol.

  python -m bench multi-scale --data omniglot --seeds 0 1 2 3 4
  python -m bench multi-scale --data dogfacenet --max-identities 300 --seeds 0 1 2 3 4

A lever probed before it is built: characters are recognised best at 160 px, photos at 224, and
the two sizes see different detail. Per seed, each weight's leave-one-out MAP@5 on the gallery
(what a build could choose by, it never sees the queries) and test MAP@5; "chosen" is the test
MAP@5 of the weight the leave-one-out picks (the first listed among equals: w = 0, the second
size alone, wins ties).

``--second-backbone`` puts a different network on the second side (``--backbone
tf_efficientnet_lite0 --second-backbone tf_efficientnet_lite2 --sizes 224 224``): two networks'
features side by side instead of one network at two sizes.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from .common import Report, format_table, mean_std

WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="orl", help="omniglot | orl | dogfacenet | a folder path")
    p.add_argument("--max-identities", type=int, help="only the first N identities (sorted by name)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--sizes", type=int, nargs=2, default=[160, 224], metavar=("FIRST", "SECOND"),
                   help="the two image sizes (default: 160 224); w weighs the first")
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--second-backbone",
                   help="the backbone of the second size's features (default: --backbone): two "
                        "different networks side by side instead of one at two sizes")


def concatenated(first: np.ndarray, second: np.ndarray, weight: float) -> np.ndarray:
    """Unit vectors of both sizes side by side, weighted so that the cosine of two
    concatenations is ``w·cos(first) + (1-w)·cos(second)``."""
    return np.concatenate([np.sqrt(weight) * first, np.sqrt(1.0 - weight) * second],
                          axis=1).astype(np.float32)


def seed_rows(samples, seed: int, views, embed) -> dict:
    from retrieval.data import whale_split

    from .postprocess import gallery_rows

    split = whale_split(samples, seed)
    gallery_ids = [s.identity for s in split.gallery]
    query_ids = [s.identity for s in split.queries]
    first, second = [(embed(view, split.gallery), embed(view, split.queries)) for view in views]
    rows = {}
    for weight in WEIGHTS:
        gallery = concatenated(first[0], second[0], weight)
        queries = concatenated(first[1], second[1], weight)
        result = gallery_rows(gallery, gallery_ids, queries, query_ids)["gallery+hub+white"]
        rows[str(weight)] = {"loo": result["val"], "test": result["test"]}
    chosen = max(WEIGHTS, key=lambda w: rows[str(w)]["loo"])
    return {"weights": rows, "chosen_weight": chosen, "chosen_test": rows[str(chosen)]["test"]}


def run(args) -> dict:
    from retrieval.models.embed import embed_images
    from retrieval.models.model import preprocessing_for, zero_shot_model

    from .ablation import _samples

    samples = _samples(args)
    backbones = (args.backbone, args.second_backbone or args.backbone)
    views = list(zip(backbones, args.sizes))  # (backbone, size) of each side
    models = {name: zero_shot_model(name) for name in set(backbones)}
    cache: dict = {}

    def embed(view: tuple[str, int], part) -> np.ndarray:
        missing = [s.path for s in part if (view, s.path) not in cache]
        if missing:
            model = models[view[0]]
            found = embed_images(model, missing, preprocessing_for(model, view[1]), progress=False)
            cache.update({(view, path): vector for path, vector in zip(missing, found)})
        return np.stack([cache[(view, s.path)] for s in part])

    report = Report("multi_scale", args, args.seeds)
    per_seed = []
    for seed in args.seeds:
        started = time.time()
        rows = seed_rows(samples, seed, views, embed)
        per_seed.append({"seed": seed, **rows, "seconds": round(time.time() - started, 1)})
        print(f"seed {seed}: " + "  ".join(f"w{w}: {r['loo']:.3f}/{r['test']:.3f}"
                                           for w, r in rows["weights"].items())
              + f"  chosen w{rows['chosen_weight']}: {rows['chosen_test']:.3f}", flush=True)
    labels = [f"{size}" if backbones[0] == backbones[1] else f"{name.split('_')[-1]}@{size}"
              for name, size in views]
    table = render_table(args.data, args.seeds, labels, per_seed)
    print(table)
    tag = f"_{args.max_identities}ids" if args.max_identities else ""
    names = "_".join(labels)
    report.write(f"multi_scale_{Path(str(args.data)).name}{tag}_{names}",
                 getattr(args, "out", None), rows=per_seed, table=table)
    return {"multi_scale": per_seed}


def render_table(data: str, seeds, sizes, per_seed: list[dict]) -> str:
    """One row per weight and the leave-one-out's choice: test MAP@5 mean ± sd and per seed."""
    def row(name: str, tests: list[float], loos: list[float] | None = None) -> list:
        spread = mean_std(tests)
        return [name, f"{spread['mean']:.3f} ± {spread['std']:.3f}",
                " ".join(f"{t:.3f}" for t in tests),
                "-" if loos is None else f"{np.mean(loos):.3f}"]

    def features(w: float) -> str:
        return f"only {sizes[1]}" if w == 0 else f"only {sizes[0]}" if w == 1 else "both"

    rows = [row(f"w = {w} ({features(w)})", [r["weights"][str(w)]["test"] for r in per_seed],
                [r["weights"][str(w)]["loo"] for r in per_seed]) for w in WEIGHTS]
    rows.append(row("chosen by leave-one-out (w " +
                    " ".join(f"{r['chosen_weight']:g}" for r in per_seed) + ")",
                    [r["chosen_test"] for r in per_seed]))
    title = (f"{data}: zero-shot features at {sizes[0]} and {sizes[1]} px concatenated "
             f"(w on {sizes[0]} px), seeds {' '.join(map(str, seeds))}")
    return format_table(["features", "test MAP@5 (mean ± sd)", "per seed", "gallery LOO"],
                        rows, title)
