"""Re-score runs kept by ``ablation --keep`` under two rules for choosing the untrained share of
the blend (issue 16: what to ship when validation cannot tell the shares apart), training nothing.

  python -m bench ablation --data orl --seeds 0 1 2 3 4 --image-size 160 --keep runs/ --variants base
  python -m bench blend-ties --data orl --seeds 0 1 2 3 4 --keep runs/

Selection scores the trained embedding blended with the untrained ImageNet features at each of
``BLEND_SHARES`` on the validation carve-out (plain cosine, threshold calibrated per share) and
ships the best. On a small gallery several shares often score the same (ORL: 22-26 validation
queries, MAP@5 saturates), and the rule for that tie decides what ships. Rows, each share's
threshold calibrated on validation, test MAP@5 on the protocol's queries (the refit
``model.pt`` embeds them, as shipped):

* ``share 0`` / ``1/2`` / ``1``: that share always;
* ``first of equals``: the smallest of the best-scoring shares (what training did until now);
* ``ties to 1/2``: of the best-scoring shares, the one nearest 1/2 (the smaller of two as near).

Each rule's hubness weight is then chosen on validation for the share it picked, as training
chooses it after the share. The trained embedding alone (``best.pt`` for validation,
``model.pt`` for test, their blends stripped) and the untrained features are cached as
``ties.npz`` beside each run.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .common import Report, format_table, mean_std, pm

SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="orl", help="omniglot | orl | dogfacenet | a folder path")
    p.add_argument("--max-identities", type=int, help="as given to ablation")
    p.add_argument("--keep", type=Path, required=True, help="the folder ablation --keep wrote")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--variant", default="base", help="the kept variant to re-score (default base)")


def first_of_equals(scores: Sequence[float]) -> int:
    """Index of the first best score: the smallest share among equals."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def ties_to_half(scores: Sequence[float], shares: Sequence[float] = SHARES) -> int:
    """Index of the best score; among equals the share nearest 1/2, the smaller of two as near."""
    return max(range(len(scores)), key=lambda i: (scores[i], -abs(shares[i] - 0.5), -i))


RULES: dict[str, Callable[[Sequence[float]], int]] = {
    "first of equals": first_of_equals, "ties to 1/2": ties_to_half}


def _embedded(run: Path, samples: Sequence, seed: int) -> dict[str, np.ndarray]:
    """Trained-alone and untrained vectors of the validation parts (``best.pt``) and the
    protocol's gallery and queries (``model.pt``), with their identities."""
    from retrieval.config import TrainConfig
    from retrieval.data import validation_split, whale_split
    from retrieval.models.checkpoint import load_model
    from retrieval.models.embed import embed_images
    from retrieval.models.model import with_pretrained_share, zero_shot_model

    cache = run / "ties.npz"
    if cache.is_file():
        return dict(np.load(cache))
    split = whale_split(samples, seed)
    validation = validation_split(split.gallery, seed=seed,
                                  new_fraction=TrainConfig().val_new_fraction)
    out: dict[str, np.ndarray] = {}
    for checkpoint, parts in (("best.pt", (("val_g", validation.gallery), ("val_q", validation.queries))),
                              ("model.pt", (("test_g", split.gallery), ("test_q", split.queries)))):
        model, preprocessing, _ = load_model(run / checkpoint)
        trained = with_pretrained_share(model, 0.0)
        untrained = zero_shot_model(model.config.backbone)
        for name, part in parts:
            paths = [s.path for s in part]
            out[name] = embed_images(trained, paths, preprocessing, progress=False)
            out[f"{name}_ref"] = embed_images(untrained, paths, preprocessing, progress=False)
            out[f"{name}_ids"] = np.array([s.identity for s in part])
    np.savez(cache, **out)
    return out


def _plain_validation(vectors: dict, share: float) -> float:
    """Validation MAP@5 of the blend at ``share``, plain cosine, threshold calibrated on it."""
    from retrieval.training.evaluate import _calibrated

    val, _ = _blended_parts(vectors, share)
    return _calibrated(val["g"], [str(i) for i in val["g_ids"]], val["q"],
                       [str(i) for i in val["q_ids"]], 5).map5


def _blended_parts(vectors: dict, share: float) -> tuple[dict, dict]:
    from retrieval.models.model import blend

    def blended(name: str) -> np.ndarray:
        return blend(vectors[name], vectors[f"{name}_ref"], share).astype(np.float32)

    return tuple({"g": blended(f"{side}_g"), "q": blended(f"{side}_q"),
                  "g_ids": vectors[f"{side}_g_ids"], "q_ids": vectors[f"{side}_q_ids"]}
                 for side in ("val", "test"))


def seed_rows(vectors: dict) -> dict[str, dict]:
    """Each fixed share and each rule: validation and test MAP@5, the share and hubness weight."""
    from .kept import _shift_rule

    no_shift = (lambda part, ranking: np.zeros(len(part["q"])))
    plain = [_plain_validation(vectors, share) for share in SHARES]
    shipped = {share: {**_shift_rule(*_blended_parts(vectors, share), no_shift, (0.0,)),
                       "share": share} for share in SHARES}
    rows = {f"share {share:g}": shipped[share] for share in (0.0, 0.5, 1.0)}
    for name, rule in RULES.items():
        rows[name] = shipped[SHARES[rule(plain)]]
    rows["tied"] = {"val": float(sum(p == max(plain) for p in plain)), "test": 0.0, "share": -1}
    return rows


def run(args) -> dict:
    from .ablation import _samples

    runs = [args.keep / args.variant / f"seed{seed}" for seed in args.seeds]
    missing = [str(r) for r in runs if not (r / "model.pt").is_file()]
    if missing:
        raise SystemExit(f"no kept run in {', '.join(missing)}: run `python -m bench ablation "
                         f"--keep {args.keep} --variants {args.variant}` with these seeds first")
    samples = _samples(args)
    report = Report("blend_ties", args, args.seeds)
    per_seed = []
    for seed, kept_run in zip(args.seeds, runs):
        per_seed.append({"seed": seed, **seed_rows(_embedded(kept_run, samples, seed))})
        print(f"seed {seed}: " + ", ".join(f"{k} {v['val']:.3f}/{v['test']:.3f} (share {v['share']:g})"
                                           for k, v in per_seed[-1].items() if k not in ("seed", "tied"))
              + f"; {int(per_seed[-1]['tied']['val'])} shares tie at the top", flush=True)
    names = [k for k in per_seed[0] if k not in ("seed", "tied")]
    base = "first of equals"
    table_rows = [[name, pm(mean_std([r[name]["val"] for r in per_seed])),
                   pm(mean_std([r[name]["test"] for r in per_seed])),
                   " ".join(f"{r[name]['share']:g}" for r in per_seed),
                   sum(r[name]["test"] > r[base]["test"] for r in per_seed),
                   sum(r[name]["test"] < r[base]["test"] for r in per_seed)]
                  for name in names]
    title = (f"{args.data}: kept runs {args.variant}, seeds {' '.join(map(str, args.seeds))}; "
             f"shares tied at the top of validation per seed: "
             f"{' '.join(str(int(r['tied']['val'])) for r in per_seed)}")
    table = format_table(["rule", "val MAP@5", "test MAP@5 (threshold from val)", "share per seed",
                          f"seeds above '{base}'", "below"], table_rows, title)
    print(table)
    tag = f"_{args.max_identities}ids" if args.max_identities else ""
    report.write(f"blend_ties_{Path(str(args.data)).name}{tag}", getattr(args, "out", None),
                 rows=per_seed, table=table)
    return {"blend_ties": per_seed}
