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
* ``ties to 1/2``: of the best-scoring shares, the one nearest 1/2 (the smaller of two as near;
  what training does now).

Both rules are training's own functions (``_best_result``, ``_best_share``).

Each rule's hubness weight is then chosen on validation for the share it picked, as training
chooses it after the share. The trained embedding alone (``best.pt`` for validation,
``model.pt`` for test, their blends stripped) and the untrained features are cached as
``ties.npz`` beside each run.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .common import Report, format_table
from .kept import add_kept_arguments, embedded


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_kept_arguments(p)
    p.add_argument("--variant", default="base", help="the kept variant to re-score (default base)")


def _rules() -> dict[str, Callable]:
    """Each rule as training implements it, over per-share ``EvalResult``s: the old first of
    equals (``_best_result``) and today's ties to 1/2 (``_best_share``)."""
    from retrieval.training.train import _best_result, _best_share

    return {"first of equals": _best_result, "ties to 1/2": _best_share}


def _trained_and_untrained(model) -> dict:
    """The checkpoint's trained embedding alone (its blend stripped) and the untrained features."""
    from retrieval.models.model import with_pretrained_share, zero_shot_model

    return {"": with_pretrained_share(model, 0.0), "_ref": zero_shot_model(model.config.backbone)}


def _blended_parts(vectors: dict, share: float) -> tuple[dict, dict]:
    """(validation, test) parts of the blend at ``share``."""
    from retrieval.models.model import blend

    def blended(name: str) -> np.ndarray:
        return blend(vectors[name], vectors[f"{name}_ref"], share).astype(np.float32)

    return tuple({"g": blended(f"{side}_g"), "q": blended(f"{side}_q"),
                  "g_ids": vectors[f"{side}_g_ids"], "q_ids": vectors[f"{side}_q_ids"]}
                 for side in ("val", "test"))


def blends(vectors: dict) -> tuple[dict, list]:
    """(validation, test) parts per share of ``BLEND_SHARES``, and each share's plain validation
    ``EvalResult`` (threshold calibrated, no hubness): what training's share rules choose from."""
    from retrieval.training.evaluate import EvalResult, _calibrated
    from retrieval.training.train import BLEND_SHARES

    parts = {share: _blended_parts(vectors, share) for share in BLEND_SHARES}
    plain = [EvalResult(_calibrated(val["g"], [str(i) for i in val["g_ids"]], val["q"],
                                    [str(i) for i in val["q_ids"]], 5).map5, 0.0, 0.0, share)
             for share, (val, _) in parts.items()]
    return parts, plain


def kept_vectors(args, cache: str = "ties.npz") -> Iterator[tuple[int, dict]]:
    """(seed, the trained and untrained vectors) of each kept run ``args.variant`` (embedded on
    first use, cached as ``cache`` beside the run); every run is checked to exist first."""
    from .ablation import _samples

    runs = [args.keep / args.variant / f"seed{seed}" for seed in args.seeds]
    missing = [str(r) for r in runs if not (r / "model.pt").is_file()]
    if missing:
        raise SystemExit(f"no kept run in {', '.join(missing)}: run `python -m bench ablation "
                         f"--keep {args.keep} --variants {args.variant}` with these seeds first")
    samples = _samples(args)
    for seed, kept_run in zip(args.seeds, runs):
        yield seed, embedded(kept_run, samples, seed, cache, _trained_and_untrained)


def seed_rows(vectors: dict) -> dict[str, dict]:
    """Each fixed share and each rule: validation and test MAP@5, the share and hubness weight;
    and how many shares tie at the top of plain validation (``tied``)."""
    from retrieval.training.train import BLEND_SHARES

    from .kept import _shift_rule

    no_shift = (lambda part, ranking: np.zeros(len(part["q"])))
    parts, plain = blends(vectors)
    shipped = {share: {**_shift_rule(*parts[share], no_shift, (0.0,)), "share": share}
               for share in BLEND_SHARES}
    rows = {f"share {share:g}": shipped[share] for share in (0.0, 0.5, 1.0)}
    for name, rule in _rules().items():
        rows[name] = shipped[rule(plain).pretrained_share]
    top = max(r.map5 for r in plain)
    return {"rows": rows, "tied": sum(r.map5 == top for r in plain)}


def run(args) -> dict:
    from .kept import rule_rows

    report = Report("blend_ties", args, args.seeds)
    per_seed = []
    for seed, vectors in kept_vectors(args):
        scored = seed_rows(vectors)
        per_seed.append({"seed": seed, "tied": scored["tied"], **scored["rows"]})
        print(f"seed {seed}: " + ", ".join(f"{k} {v['val']:.3f}/{v['test']:.3f} (share {v['share']:g})"
                                           for k, v in scored["rows"].items())
              + f"; {scored['tied']} shares tie at the top", flush=True)
    names = [k for k in per_seed[0] if k not in ("seed", "tied")]
    base = "first of equals"
    table_rows = [[name, val, test, " ".join(f"{r[name]['share']:g}" for r in per_seed), *counts]
                  for name, val, test, *counts in rule_rows(per_seed, names, base)]
    title = (f"{args.data}: kept runs {args.variant}, seeds {' '.join(map(str, args.seeds))}; "
             f"shares tied at the top of validation per seed: "
             f"{' '.join(str(r['tied']) for r in per_seed)}")
    table = format_table(["rule", "val MAP@5", "test MAP@5 (threshold from val)", "share per seed",
                          f"seeds above '{base}'", "below"], table_rows, title)
    print(table)
    tag = f"_{args.max_identities}ids" if args.max_identities else ""
    report.write(f"blend_ties_{Path(str(args.data)).name}{tag}", getattr(args, "out", None),
                 rows=per_seed, table=table)
    return {"blend_ties": per_seed}
