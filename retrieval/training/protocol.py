"""The whale protocol (../shared/data/README.md): split a labelled set from a seed, train on the
gallery part only, answer the held-out queries, score MAP@5 beside two reference points:

* ``constant_new_whale``: answer ``new_whale`` first for everyone (scores the share of new queries);
* ``pretrained_gem``: the untrained ImageNet backbone with GeM (no fine-tuning), without a
  threshold; with a threshold calibrated the way training calibrates the engine's (on the
  validation carve-out of the gallery, never the test queries: what the threshold alone is worth);
  and with the best threshold chosen *on the test queries* (an oracle: an upper bound for that
  baseline, which makes beating it a stricter test).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .. import NEW_WHALE
from ..config import TrainConfig
from ..data import QuerySplit, Sample, validation_split, whale_split
from ..errors import UserError
from ..files import atomic_write
from ..metrics import calibrate_threshold, map_at_k
from ..models.checkpoint import load_model
from ..models.model import preprocessing_for, zero_shot_model
from .evaluate import rank_queries, score
from .train import train

log = logging.getLogger(__name__)

COLUMNS = {
    "constant_new_whale": "constant new_whale",
    "pretrained_gem": "pretrained + GeM",
    "pretrained_gem_calibrated_threshold": "pretrained + GeM, calibrated threshold",
    "pretrained_gem_oracle_threshold": "pretrained + GeM, best test threshold",
    "engine_no_threshold": "trained, no threshold",
    "engine": "trained, calibrated threshold",
}


def zero_shot_scores(config: TrainConfig, gallery: Sequence[Sample],
                     queries: Sequence[Sample]) -> dict[str, float]:
    """MAP@5 of the untrained pretrained backbone + GeM: without a threshold, with one calibrated
    on ``validation_split(gallery)`` exactly as training calibrates the engine's, and with the
    oracle threshold (best on the test queries)."""
    model = zero_shot_model(config.backbone)
    preprocessing = preprocessing_for(model, config.image_size)
    validation = validation_split(gallery, seed=config.seed, new_fraction=config.val_new_fraction)
    threshold = None
    if validation.queries:
        val_ranking = rank_queries(model, preprocessing, validation.gallery, validation.queries)
        threshold, _ = calibrate_threshold(val_ranking.identities, val_ranking.scores,
                                           [q.identity for q in validation.queries])
    ranking = rank_queries(model, preprocessing, gallery, queries)
    truths = [q.identity for q in queries]
    _, oracle = calibrate_threshold(ranking.identities, ranking.scores, truths)
    return {"pretrained_gem": score(ranking, truths, None),
            "pretrained_gem_calibrated_threshold": score(ranking, truths, threshold),
            "pretrained_gem_oracle_threshold": oracle}


def export_split(split: QuerySplit, data_root: Path, out: Path) -> None:
    """Write the split as a user would have it: ``gallery.csv`` (Image paths relative to the data
    root, Id), the query images copied to ``queries/`` and their truth in ``queries_truth.csv``,
    so build_index.py / query.py / the submission scorer can replay the protocol."""
    gallery = pd.DataFrame({"Image": [s.path.relative_to(data_root).as_posix() for s in split.gallery],
                            "Id": [s.identity for s in split.gallery]})
    atomic_write(out / "gallery.csv", lambda temp: gallery.to_csv(temp, index=False))
    queries = out / "queries"
    queries.mkdir(parents=True, exist_ok=True)
    names = [f"{i:04d}{s.path.suffix}" for i, s in enumerate(split.queries)]
    for name, sample in zip(names, split.queries):
        shutil.copyfile(sample.path, queries / name)
    truth = pd.DataFrame({"Image": names, "Id": [s.identity for s in split.queries]})
    atomic_write(out / "queries_truth.csv", lambda temp: truth.to_csv(temp, index=False))


def run_seed(config: TrainConfig, samples: Sequence[Sample], seed: int,
             data_root: Path | None = None) -> dict | None:
    """One seed of the protocol; the result on the main process, None on the others."""
    split = whale_split(samples, seed)
    run_config = replace(config, out=str(Path(config.out) / f"seed{seed}"), seed=seed)
    checkpoint = train(run_config, split.gallery)
    from ..distributed import setup
    if not setup(config.device).is_main:
        return None
    if data_root is not None:
        export_split(split, Path(data_root), Path(run_config.out))
    model, preprocessing, payload = load_model(checkpoint)
    ranking = rank_queries(model, preprocessing, split.gallery, split.queries,
                           hubness=payload.get("hubness", 0.0),
                           whiten=payload.get("whiten", False),
                           local=payload.get("local", 0.0))
    truths = [q.identity for q in split.queries]
    return {
        "seed": seed, "queries": len(truths), "new_queries": truths.count(NEW_WHALE),
        "gallery_images": len(split.gallery), "threshold": payload["threshold"],
        "pretrained_share": payload["model_config"].get("pretrained_share", 0.0),
        "pretrained_whitening": payload["model_config"].get("pretrained_whitening", False),
        "weight_share": payload["metrics"].get("weight_share", 0.0),
        "hubness": payload.get("hubness", 0.0),
        "whitened": payload.get("whiten", False),
        "local": payload.get("local", 0.0),
        "companion_share": payload["model_config"].get("companion_share", 0.0),
        "constant_new_whale": map_at_k([[NEW_WHALE]] * len(truths), truths),
        **zero_shot_scores(replace(run_config, image_size=preprocessing.image_size),
                           split.gallery, split.queries),  # at the size the model trained at
        "engine_no_threshold": score(ranking, truths, None),
        "engine": score(ranking, truths, payload["threshold"]),
    }


def summarise(results: Sequence[dict]) -> dict:
    """Mean and spread (sample standard deviation; 0 for one seed) of every MAP@5 column."""
    summary = {}
    for key in COLUMNS:
        values = np.array([r[key] for r in results])
        summary[key] = {"mean": float(values.mean()),
                        "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
    return summary


def format_table(results: Sequence[dict]) -> str:
    seeds = [r["seed"] for r in results]
    header = f"{'MAP@5 (whale protocol)':40s}" + "".join(f"{'seed ' + str(s):>9s}" for s in seeds)
    header += f"{'mean ± std':>16s}"
    lines = [header, "-" * len(header)]
    summary = summarise(results)
    for key, title in COLUMNS.items():
        cells = "".join(f"{r[key]:9.3f}" for r in results)
        lines.append(f"{title:40s}{cells}{summary[key]['mean']:9.3f} ± {summary[key]['std']:.3f}")
    return "\n".join(lines)


def run(config: TrainConfig, samples: Sequence[Sample], seeds: Sequence[int],
        data_root: str | Path) -> list[dict]:
    results = [r for r in (run_seed(config, samples, s, Path(data_root)) for s in seeds)
               if r is not None]
    if results:
        report = {"data": str(data_root), "config": config.__dict__, "seeds": list(seeds),
                  "results": results, "summary": summarise(results)}
        path = Path(config.out) / "protocol.json"
        atomic_write(path, lambda temp: temp.write_text(json.dumps(report, indent=2)))
        print(format_table(results))
        print(f"(written to {path})")
    return results


def check_exportable(samples: Sequence[Sample], gallery: str | Path) -> None:
    """The protocol writes each split's gallery.csv with paths relative to --gallery, so an image
    outside it (--allow-outside) is refused now rather than after the training it would follow."""
    root = os.path.abspath(gallery)
    outside = [s.path for s in samples
               if os.path.commonpath([root, os.path.abspath(s.path)]) != root]
    if outside:
        raise UserError(f"--whale-protocol exports paths relative to --gallery, but {len(outside)} "
                        f"image(s) lie outside it (e.g. {outside[0]}): copy them into {gallery}, "
                        "or drop --whale-protocol")
