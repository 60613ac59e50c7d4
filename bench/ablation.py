"""Levers of the training recipe, one row each, on the whale protocol (issue 16's ablation).

  python -m bench ablation --data dogfacenet --max-identities 300 --seeds 0 1 \\
      --variants base "lr1e-5+fbn=lr:1e-5,freeze_bn:true" "frozen=warmup_epochs:15"

A variant is ``NAME=field:value,field:value`` over ``TrainConfig`` (any field of the run config;
values are parsed as JSON, else kept as text); ``base`` alone is the default recipe. Every row
trains on each seed's gallery and reports the validation MAP@5 of the model its selection stage
chose, as shipped (blend or weight share included: the number to choose by, it never sees the
test queries), then the test MAP@5 without and with the calibrated threshold, the untrained
backbone's calibrated score on the same split, and the training seconds per seed.
``--max-identities`` keeps the first N identities (sorted by name), for quick screens on big sets.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import Report, data_path, format_table, mean_std, pm, suite_config
from .peers import engine_train_seconds

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="orl", help="omniglot | orl | dogfacenet | a folder path")
    p.add_argument("--max-identities", type=int,
                   help="only the first N identities (sorted by name): quick screens")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--postprocess", action="store_true",
                   help="also score query expansion / database-side augmentation on every run "
                        "(bench/postprocess.py)")
    p.add_argument("--untrained", action="store_true",
                   help="train nothing: score the post-processing variants (query expansion, "
                        "database-side augmentation, hubness correction, within-identity "
                        "whitening) on the untrained "
                        "backbone + GeM, each with a threshold calibrated on its validation "
                        "carve-out; --variants is ignored")
    p.add_argument("--keep", type=Path,
                   help="keep every run's folder (best.pt, model.pt, log.csv) under this folder "
                        "as VARIANT/seedN, for post-processing screens after the runs; by "
                        "default they go to a temporary folder that is deleted")
    p.add_argument("--variants", nargs="+", default=["base"],
                   help="NAME=field:value,... over TrainConfig; 'base' is the default recipe")


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``lr1e-5=lr:1e-5,freeze_bn:true`` -> ("lr1e-5", {"lr": 1e-05, "freeze_bn": True});
    a list value keeps its commas: ``depth=trainable_blocks:[0,1]``."""
    from retrieval.config import FIELDS

    name, _, spec = text.partition("=")
    overrides: dict[str, Any] = {}
    for item in filter(None, re.split(r",(?![^\[]*\])", spec)):
        field, _, raw = item.partition(":")
        if field not in FIELDS:
            raise SystemExit(f"variant {name}: unknown field {field!r} (fields: {', '.join(FIELDS)})")
        try:
            overrides[field] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[field] = raw
    return name, overrides


def _samples(args):
    from retrieval.data import group_by_identity, read_folder_gallery

    samples = read_folder_gallery(data_path(args.data))
    if args.max_identities:
        keep = set(sorted(group_by_identity(samples))[: args.max_identities])
        samples = [s for s in samples if s.identity in keep]
    return samples


def _best_validation(run: Path) -> float:
    """The validation MAP@5 of the model selection chose, as shipped (blended with the untrained
    features or moved towards the ImageNet weights where selection chose to): ``best.pt``'s."""
    from retrieval.models.checkpoint import load_checkpoint

    return float(load_checkpoint(run / "best.pt")["metrics"]["val_map5"])


def run_untrained(args) -> dict:
    """``--untrained``: every post-processing variant on the untrained backbone, per seed."""
    from retrieval.config import TrainConfig

    from .postprocess import VARIANTS, WHITENED, untrained_scores

    samples = _samples(args)
    report = Report("ablation", args, args.seeds)
    defaults = TrainConfig()
    per_seed = []
    for seed in args.seeds:
        per_seed.append({"seed": seed, **untrained_scores(
            samples, seed, defaults.val_new_fraction, args.image_size, defaults.backbone)})
        names = [v for v in per_seed[-1] if v != "seed"]
        print(f"seed {seed}: " + ", ".join(f"{v} {per_seed[-1][v]['val']:.3f}/"
                                           f"{per_seed[-1][v]['test']:.3f}" for v in names),
              flush=True)
    # "gallery", "gallery+hub": build_index.py's zero-shot path (leave-one-out on the gallery);
    # "gallery+hub+white": today's zero-shot default, compared with "gallery+hub"
    reference = {"gallery+hub": "gallery", "gallery+hub+white": "gallery+hub"}
    table_rows = [[variant, pm(mean_std([r[variant]["val"] for r in per_seed])),
                   pm(mean_std([r[variant]["test"] for r in per_seed])),
                   sum(r[variant]["test"] > r[reference.get(variant, "plain")]["test"]
                       for r in per_seed)]
                  for variant in [*VARIANTS, *WHITENED, "hub+centroid", "gallery", "gallery+hub", "gallery+hub+white"]]
    title = (f"{args.data}{f' (first {args.max_identities} identities)' if args.max_identities else ''}: "
             f"untrained backbone + GeM, whale protocol, {args.image_size}px, seeds "
             f"{' '.join(map(str, args.seeds))}; choose by the validation column")
    table = format_table(["variant", "val MAP@5", "test MAP@5 (threshold from val)",
                          "seeds above plain (gallery; gallery+hub for +white) on test"],
                         table_rows, title)
    print(table)
    tag = f"_{args.max_identities}ids" if args.max_identities else ""
    report.write(f"ablation_untrained_{Path(str(args.data)).name}{tag}_{args.image_size}px",
                 getattr(args, "out", None), rows=per_seed, table=table)
    return {"untrained": per_seed}


def run(args) -> dict:
    from dataclasses import replace

    if args.untrained:
        return run_untrained(args)

    from retrieval.training.protocol import run_seed

    samples = _samples(args)
    report = Report("ablation", args, args.seeds)
    variants = [parse_variant(v) for v in args.variants]
    rows: dict[str, list[dict]] = {}
    kept = contextlib.nullcontext(args.keep) if args.keep else None
    with kept or tempfile.TemporaryDirectory(prefix="bench-ablation-") as temp:
        for name, overrides in variants:
            for seed in args.seeds:
                out = Path(temp) / name
                config = replace(suite_config(args, "arcface", seed, out), **overrides)
                started = time.time()
                result = run_seed(config, samples, seed)
                best_val = _best_validation(out / f"seed{seed}")
                seconds = engine_train_seconds(out / f"seed{seed}" / "model.pt")
                if args.postprocess:
                    from .postprocess import scores

                    result["postprocess"] = scores(out / f"seed{seed}", samples, seed,
                                                   config.val_new_fraction)
                    print(f"{name} seed {seed} post-processing: {result['postprocess']}", flush=True)
                rows.setdefault(name, []).append({**result, "overrides": overrides,
                                                  "val_map5_best": best_val,
                                                  "train_seconds": seconds,
                                                  "wall_seconds": round(time.time() - started, 1)})
                print(f"{name} seed {seed}: val {best_val:.3f}, test {result['engine']:.3f} "
                      f"(untrained {result['pretrained_gem_calibrated_threshold']:.3f})", flush=True)
    columns = [("val_map5_best", "val MAP@5 (chosen, shipped)"),
               ("pretrained_gem_calibrated_threshold", "untrained + threshold"),
               ("engine_no_threshold", "engine, no threshold"), ("engine", "engine + threshold")]
    table_rows = []
    for name, results in rows.items():
        cells = [pm(mean_std([r[key] for r in results])) for key, _ in columns]
        delta = mean_std([r["engine"] - r["pretrained_gem_calibrated_threshold"] for r in results])
        table_rows.append([name, *cells, pm(delta), round(sum(r["train_seconds"] for r in results)
                                                           / len(results))])
    title = (f"{args.data}{f' (first {args.max_identities} identities)' if args.max_identities else ''}: "
             f"whale protocol, {args.image_size}px, {args.epochs} epochs, seeds "
             f"{' '.join(map(str, args.seeds))}; choose by the validation column")
    table = format_table(["variant", *[title_ for _, title_ in columns], "engine - untrained",
                          "train s/seed"], table_rows, title)
    print(table)
    tag = f"_{args.max_identities}ids" if args.max_identities else ""
    report.write(f"ablation_{Path(str(args.data)).name}{tag}_{args.image_size}px", getattr(args, "out", None),
                 variants=dict(variants), rows=rows, table=table)
    return rows
