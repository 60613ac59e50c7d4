"""Re-score runs kept by ``ablation --keep``: two trained depths as one ensemble, and two other
rules for answering ``new_whale`` (issue 16, levers 6 and 7), without training anything.

  python -m bench ablation --data orl --seeds 0 1 --image-size 160 --keep runs/ \\
      --variants tb0=trainable_blocks:0 tb1=trainable_blocks:1
  python -m bench kept --data orl --seeds 0 1 --keep runs/

The default recipe already trains both depths (``trainable_blocks: [0, 1]``) and keeps the one
validation prefers; each of the two variants above trains exactly what that run trains for its
depth. Rows, each with its threshold (and hubness weight from ``index.hubness.WEIGHTS``, the
first of equals kept) chosen on the validation carve-out embedded by ``best.pt``, and test
MAP@5 on the protocol's queries embedded by the refit ``model.pt``:

* ``A``, ``B``: each depth alone; ``depth choice``: the better on validation (A on ties), what
  the default ships (less its whitening choice);
* ``ensemble, share chosen``: both models' unit vectors concatenated, B weighing ``w`` of the
  cosine similarity (``model.blend``), ``w`` in 0, 1/4, 1/2, 3/4, 1 chosen on validation;
  ``ensemble 1/2``: ``w`` fixed at 1/2;
* ``A, query-side``: the other half of CSLS (Conneau et al., ICLR 2018): each query's scores
  lowered by ``w`` x its mean similarity to its 10 nearest gallery images, ``w`` chosen on
  validation. It cannot change a ranking, only where ``new_whale`` goes;
* ``A, top-2 gap``: scores lowered by ``w`` x (best - second identity's score), ``w`` chosen:
  a query close to two identities alike is more likely someone new (Lowe's ratio test);
* ``A, centroid b``: an identity scored by ``(1 - b)`` x its best image's (hubness-corrected)
  similarity + ``b`` x the similarity to the normalised mean of its images (less their mean
  correction), ``b`` in 0, 1/4, 1/2 chosen with the hubness weight on validation (0 first).

Embeddings are cached as ``emb.npz`` beside each run's checkpoints.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .common import Report, format_table, mean_std, pm
from .postprocess import centroid_rule

SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)


def add_kept_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of every suite that re-scores runs kept by ``ablation --keep``."""
    p.add_argument("--data", default="orl", help="omniglot | orl | dogfacenet | a folder path")
    p.add_argument("--max-identities", type=int, help="as given to ablation")
    p.add_argument("--keep", type=Path, required=True, help="the folder ablation --keep wrote")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_kept_arguments(p)
    p.add_argument("--pair", nargs=2, default=["tb0", "tb1"], metavar=("A", "B"),
                   help="the two kept variants (default: tb0 tb1)")


def embedded(run: Path, samples: Sequence, seed: int, cache: str = "emb.npz",
             encoders: Callable | None = None) -> dict[str, np.ndarray]:
    """Validation parts by ``best.pt``, protocol gallery / queries by ``model.pt``, with ids,
    cached as ``cache`` beside the run. ``encoders(model)``: {name suffix: model to embed with}
    for each loaded checkpoint (default: the checkpoint itself, no suffix)."""
    from retrieval.config import TrainConfig
    from retrieval.data import validation_split, whale_split
    from retrieval.models.checkpoint import load_model
    from retrieval.models.embed import embed_images

    if (run / cache).is_file():
        return dict(np.load(run / cache))
    split = whale_split(samples, seed)
    validation = validation_split(split.gallery, seed=seed,
                                  new_fraction=TrainConfig().val_new_fraction)
    out = {}
    for checkpoint, parts in (("best.pt", (("val_g", validation.gallery), ("val_q", validation.queries))),
                              ("model.pt", (("test_g", split.gallery), ("test_q", split.queries)))):
        model, preprocessing, _ = load_model(run / checkpoint)
        models = encoders(model) if encoders is not None else {"": model}
        for name, part in parts:
            paths = [s.path for s in part]
            for suffix, encoder in models.items():
                out[f"{name}{suffix}"] = embed_images(encoder, paths, preprocessing, progress=False)
            out[f"{name}_ids"] = np.array([s.identity for s in part])
    np.savez(run / cache, **out)
    return out


def _ranking(gallery, gallery_ids, queries, hubness: float):
    from index import GalleryIndex

    return GalleryIndex(gallery, [str(i) for i in gallery_ids], hubness=hubness).search(queries, 5)


def _query_density(gallery: np.ndarray, queries: np.ndarray, k: int = 10) -> np.ndarray:
    similarities = queries @ gallery.T
    return -np.sort(-similarities, axis=1)[:, :min(k, gallery.shape[0])].mean(axis=1)


def _top2_gap(ranking) -> np.ndarray:
    return ranking.scores[:, 0] - ranking.scores[:, 1]


def _shift_rule(val: dict, test: dict, shift, weights: Sequence[float]) -> dict:
    """Scores lowered by ``w * shift(part, ranking)`` per query; (w, hubness) chosen on
    validation (``weights`` first, then ``WEIGHTS``, the first of equals kept). Each part is
    searched once per hubness weight; only the shift changes with ``w``."""
    from index.hubness import WEIGHTS
    from retrieval.metrics import calibrate_threshold
    from retrieval.training.evaluate import score

    searched = {hubness: {name: _ranking(part["g"], part["g_ids"], part["q"], hubness)
                          for name, part in (("val", val), ("test", test))}
                for hubness in WEIGHTS}
    shifts = {(hubness, name): shift(part, searched[hubness][name])
              for hubness in WEIGHTS for name, part in (("val", val), ("test", test))}
    best = None
    for w in weights:
        for hubness in WEIGHTS:
            val_scores = searched[hubness]["val"].scores - w * shifts[hubness, "val"][:, None]
            threshold, chosen_by = calibrate_threshold(searched[hubness]["val"].identities,
                                                       val_scores, list(val["q_ids"]))
            if best is None or chosen_by > best["val"]:
                tested = replace(searched[hubness]["test"],
                                 scores=searched[hubness]["test"].scores
                                 - w * shifts[hubness, "test"][:, None])
                best = {"val": chosen_by, "weight": w, "hubness": hubness,
                        "test": score(tested, [str(t) for t in test["q_ids"]], threshold)}
    return best


def _parts(a: dict, b: dict | None = None, w: float = 0.0) -> tuple[dict, dict]:
    """(validation, test) parts: ``a``'s vectors, or ``a`` and ``b`` blended at share ``w``."""
    from retrieval.models.model import blend

    def vectors(name):
        return a[name] if b is None else blend(a[name], b[name], w).astype(np.float32)

    return tuple({"g": vectors(f"{side}_g"), "q": vectors(f"{side}_q"),
                  "g_ids": a[f"{side}_g_ids"], "q_ids": a[f"{side}_q_ids"]}
                 for side in ("val", "test"))


def seed_rows(a: dict, b: dict) -> dict[str, dict]:
    no_shift = (lambda part, ranking: np.zeros(len(part["q"])))
    rows = {"A": _shift_rule(*_parts(a), no_shift, (0.0,)),
            "B": _shift_rule(*_parts(b), no_shift, (0.0,))}
    rows["depth choice"] = max((rows["A"], rows["B"]), key=lambda r: r["val"])
    shares = {w: _shift_rule(*_parts(a, b, w), no_shift, (0.0,)) for w in SHARES}
    rows["ensemble, share chosen"] = {**max(shares.values(), key=lambda r: r["val"]),
                                      "share": max(shares, key=lambda w: shares[w]["val"])}
    rows["ensemble 1/2"] = shares[0.5]
    rows["A, query-side"] = _shift_rule(*_parts(a), lambda part, _: _query_density(part["g"], part["q"]),
                                        (0.0, 0.25, 0.5, 1.0))
    rows["A, top-2 gap"] = _shift_rule(*_parts(a), lambda _, ranking: -_top2_gap(ranking),
                                       (0.0, 0.5, 1.0))
    rows["A, centroid b"] = centroid_rule(*_parts(a))
    return rows


def rule_rows(per_seed: list[dict], names: Sequence[str], base: str) -> list[list]:
    """Table rows per rule: its name, mean ± std validation and test MAP@5 over the seeds, and
    on how many seeds its test MAP@5 is above and below that of rule ``base``."""
    return [[name, pm(mean_std([r[name]["val"] for r in per_seed])),
             pm(mean_std([r[name]["test"] for r in per_seed])),
             sum(r[name]["test"] > r[base]["test"] for r in per_seed),
             sum(r[name]["test"] < r[base]["test"] for r in per_seed)]
            for name in names]


def run(args) -> dict:
    from .ablation import _samples

    missing = [str(args.keep / name / f"seed{seed}") for name in args.pair for seed in args.seeds
               if not (args.keep / name / f"seed{seed}" / "model.pt").is_file()]
    if missing:
        raise SystemExit(f"no kept run in {', '.join(missing)}: run `python -m bench ablation "
                         f"--keep {args.keep} --variants {args.pair[0]}=... {args.pair[1]}=...` with these "
                         "seeds first (see --help)")
    samples = _samples(args)
    report = Report("kept", args, args.seeds)
    per_seed = []
    for seed in args.seeds:
        a, b = (embedded(args.keep / name / f"seed{seed}", samples, seed) for name in args.pair)
        per_seed.append({"seed": seed, **seed_rows(a, b)})
        print(f"seed {seed}: " + ", ".join(f"{k} {v['val']:.3f}/{v['test']:.3f}"
                                           for k, v in per_seed[-1].items() if k != "seed"),
              flush=True)
    names = [k for k in per_seed[0] if k != "seed"]
    table_rows = [[name.replace("A", args.pair[0]).replace("B", args.pair[1]) if len(name) == 1
                   else name, *cells] for name, *cells in rule_rows(per_seed, names, "depth choice")]
    title = (f"{args.data}: kept runs {args.pair[0]} (A) / {args.pair[1]} (B), seeds "
             f"{' '.join(map(str, args.seeds))}; choose by the validation column")
    table = format_table(["rule", "val MAP@5", "test MAP@5 (threshold from val)",
                          "seeds above depth choice", "below"], table_rows, title)
    print(table)
    tag = f"_{args.max_identities}ids" if args.max_identities else ""
    report.write(f"kept_{Path(str(args.data)).name}{tag}", getattr(args, "out", None),
                 rows=per_seed, table=table)
    return {"kept": per_seed}
