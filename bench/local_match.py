"""Local matching (issue 16): the pooled cosine blended with the chamfer similarity of the
untrained backbone's mid-level descriptors (``index.local_match``), training nothing.

  python -m bench local-match --data omniglot --seeds 0 1 2 3 4 --image-size 160
  python -m bench local-match --data orl --seeds 0 1 --image-size 160 --keep runs/ --variant base

A gallery image's similarity to a query becomes ``(1 - beta) x cosine + beta x chamfer``, the
hubness correction (weight ``w``, ``index.hubness``) computed on these blended similarities, and
an identity scores its best image, as ``GalleryIndex`` folds. ``beta`` in ``BETAS`` (0 first,
so the plain search wins ties) and ``w`` in ``index.hubness.WEIGHTS`` are chosen with the
``new_whale`` threshold, never on test queries. Rows, test MAP@5 per seed:

* ``zero-shot index as shipped``: ``build_index.py`` without ``--model`` at this size
  (threshold, hubness and whitening chosen on the gallery's leave-one-out: ``postprocess
  .gallery_rows``' ``gallery+hub+white``), for reference;
* ``zero-shot, pooled + hub``: ``beta`` 0, ``w`` chosen by the gallery's leave-one-out
  (every gallery image a query against the others, an identity's only image a ``new_whale``);
* ``zero-shot, + local``: ``(beta, w)`` chosen by that leave-one-out;
* ``zero-shot whitened as shipped, ...``: the same two rows with the pooled vectors whitened
  within identities by the map the shipped index fits, on the seeds where its gallery chooses
  whitening (elsewhere the same as the plain rows; the map is fitted on the whole gallery, so
  the leave-one-out of both rows is a little optimistic);
* with ``--keep``: ``trained, pooled + hub``, the kept run's embedding blended at the share
  training's rule picks (``blend_ties``), whitened where its model.pt ships whitened (a map
  fitted on each side's labelled gallery), ``w`` chosen on the validation carve-out, and
  ``trained, + local``, ``(beta, w)`` chosen there. The local descriptors are always the
  ImageNet backbone's: the trained model adds its pooled vector, not its maps.

The descriptors are centred on their gallery's mean (the protocol gallery for test, the
validation gallery for validation) before the chamfer similarity.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .common import Report, format_table

BETAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="orl", help="omniglot | orl | dogfacenet | a folder path")
    p.add_argument("--max-identities", type=int, help="only the first N identities (sorted by name)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--image-size", type=int, default=160,
                   help="image size of the zero-shot rows and of the local descriptors")
    p.add_argument("--keep", type=Path,
                   help="the folder `ablation --keep` wrote: adds the trained rows of its runs "
                        "(without it, zero-shot rows only)")
    p.add_argument("--variant", default="base", help="the kept variant to re-score (default base)")


def _hubness(gallery_similarity: np.ndarray) -> np.ndarray:
    """Each gallery image's mean similarity to its ``index.hubness.K`` nearest other gallery
    images (``gallery_hubness`` on a similarity matrix instead of vectors)."""
    from index.hubness import K

    s = gallery_similarity.astype(np.float64, copy=True)
    np.fill_diagonal(s, -np.inf)
    k = min(K, max(len(s) - 1, 1))
    return -np.sort(-s, axis=1)[:, :k].mean(axis=1)


def _leave_one_out(folds: Sequence[tuple[np.ndarray, np.ndarray]], local_gg: np.ndarray,
                   gallery_ids: Sequence[str], beta: float, weight: float) -> tuple[float, float]:
    """(threshold, MAP@5) of every gallery image asked against the others, an identity's only
    image a ``new_whale``. ``folds``: (pooled gallery x gallery similarities, the rows asked in
    that space): one space for plain vectors; for whitened ones, one per fold, each whitened by
    a map fitted without the fold's queries, as ``retrieval.gallery_threshold`` does it."""
    from retrieval.metrics import NEW_WHALE, calibrate_threshold

    from .rerank import ranking_from_similarity

    ids = np.asarray(gallery_ids)
    names, counts = np.unique(ids, return_counts=True)
    several = dict(zip(names, counts > 1))
    identities, scores, truths = [], [], []
    for pooled_gg, rows in folds:
        blended = (1.0 - beta) * pooled_gg + beta * local_gg
        s = blended[rows] - weight * _hubness(blended)[None]
        s[np.arange(len(rows)), rows] = -np.inf
        ranked = ranking_from_similarity(s, ids)
        identities += list(ranked.identities)
        scores.append(ranked.scores)
        truths += [str(ids[r]) if several[ids[r]] else NEW_WHALE for r in rows]
    return calibrate_threshold(identities, np.concatenate(scores), truths)


def _queried(query_similarity: np.ndarray, gallery_similarity: np.ndarray,
             gallery_ids: Sequence[str], weight: float):
    from .rerank import ranking_from_similarity

    return ranking_from_similarity(query_similarity - weight * _hubness(gallery_similarity)[None],
                                   np.asarray(gallery_ids))


def _blended(pooled: dict, local: dict, beta: float) -> dict:
    return {key: (1.0 - beta) * pooled[key] + beta * local[key] for key in pooled}


def _choose(candidates: Sequence[tuple[float, float]], validate) -> dict:
    """The (beta, w) whose validation MAP@5 is highest, the first of equals kept."""
    best = None
    for beta, weight in candidates:
        threshold, val = validate(beta, weight)
        if best is None or val > best["val"]:
            best = {"beta": beta, "hubness": weight, "threshold": threshold, "val": val}
    return best


def _cosine_pairs(queries: np.ndarray, gallery: np.ndarray) -> dict:
    """Pooled cosines, query x gallery (``qg``) and gallery x gallery (``gg``)."""
    return {"qg": _cosines(queries, gallery), "gg": _cosines(gallery, gallery)}


def _local_pairs(maps: np.ndarray, query_rows: np.ndarray, gallery_rows: np.ndarray) -> dict:
    """Chamfer similarities, query x gallery (``qg``) and gallery x gallery (``gg``), of the
    descriptors centred on the gallery's mean."""
    from index.local_match import chamfer_similarity, mean_descriptor, normalised_descriptors

    mean = mean_descriptor(maps[gallery_rows])
    queries = normalised_descriptors(maps[query_rows], mean)
    gallery = normalised_descriptors(maps[gallery_rows], mean)
    return {"qg": chamfer_similarity(queries, gallery).astype(np.float64),
            "gg": chamfer_similarity(gallery, gallery).astype(np.float64)}


def _zero_shot_rows(vectors: np.ndarray, local: dict, rows: dict, ids: dict) -> dict:
    """The zero-shot rows; ``local``: the test side's chamfer similarities (``_local_pairs``)."""
    from index.hubness import WEIGHTS
    from index.whitening import whiten
    from retrieval.gallery_threshold import _folds, choose_gallery_space
    from retrieval.training.evaluate import score

    from .postprocess import gallery_rows

    g, q = rows["test_g"], rows["test_q"]
    gallery_ids = list(ids["test_g"])
    shipped = gallery_rows(vectors[g], gallery_ids, vectors[q], list(ids["test_q"]))
    out = {"zero-shot index as shipped": shipped["gallery+hub+white"]}
    # the pooled vectors as the shipped index searches them: whitened where its gallery chose
    # it, the leave-one-out then answered fold by fold in maps fitted without the fold
    _, whitening = choose_gallery_space(vectors[g], gallery_ids, weights=WEIGHTS)
    plain = (vectors[g], vectors[q], [(_cosines(vectors[g], vectors[g]), np.arange(len(g)))])
    spaces = {"zero-shot": plain, "zero-shot whitened as shipped": plain}
    if whitening is not None:
        folds = [(_cosines(space, space), fold_rows) for space, fold_rows in
                 _folds(vectors[g], np.asarray(gallery_ids, dtype=object), np.arange(len(g)), 0)]
        spaces["zero-shot whitened as shipped"] = (whiten(vectors[g], *whitening),
                                                   whiten(vectors[q], *whitening), folds)
    for space, (gallery, queries, folds) in spaces.items():
        pooled = _cosine_pairs(queries, gallery)
        grids = {f"{space}, pooled + hub": [(0.0, w) for w in WEIGHTS],
                 f"{space}, + local": [(b, w) for b in BETAS for w in WEIGHTS]}
        for name, grid in grids.items():
            chosen = _choose(grid, lambda b, w: _leave_one_out(folds, local["gg"], gallery_ids,
                                                               b, w))
            sims = _blended(pooled, local, chosen["beta"])
            chosen["test"] = score(_queried(sims["qg"], sims["gg"], gallery_ids,
                                            chosen["hubness"]),
                                   list(ids["test_q"]), chosen["threshold"])
            out[name] = chosen
    return out


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a.astype(np.float64) @ b.astype(np.float64).T


def _trained_rows(kept: dict, whitened: bool, local: dict, ids: dict) -> dict:
    """The kept run's shipped blend, searched with and without the local similarity; each
    choice on the validation carve-out. ``whitened``: the run's model.pt ships whitened, so
    both sides are whitened by a map fitted on their own labelled gallery (for validation the
    validation gallery: training fits it fold by fold on more images, so the pooled row's
    validation differs a little from training's). ``local``: each side's chamfer
    similarities (``_local_pairs``)."""
    from index.hubness import WEIGHTS
    from retrieval.metrics import calibrate_threshold
    from retrieval.models.whitening import fit_within_identity, whiten
    from retrieval.training.evaluate import score
    from retrieval.training.train import _best_share

    from .blend_ties import blends

    parts, plain = blends(kept)
    share = _best_share(plain).pretrained_share
    val, test = parts[share]
    sides = {}
    for side, part in (("val", val), ("test", test)):
        assert list(part["g_ids"]) == list(ids[f"{side}_g"]), "kept vectors out of step"
        gallery, queries = part["g"], part["q"]
        fitted = fit_within_identity(gallery, list(ids[f"{side}_g"])) if whitened else None
        if fitted is not None:  # as the index whitens: a map fitted on the labelled gallery
            gallery, queries = whiten(gallery, *fitted), whiten(queries, *fitted)
        sides[side] = (_cosine_pairs(queries, gallery), local[side])

    def validate(beta: float, weight: float) -> tuple[float, float]:
        sims = _blended(*sides["val"], beta)
        ranked = _queried(sims["qg"], sims["gg"], ids["val_g"], weight)
        return calibrate_threshold(ranked.identities, ranked.scores, list(ids["val_q"]))

    out = {}
    grids = {"trained, pooled + hub": [(0.0, w) for w in WEIGHTS],
             "trained, + local": [(b, w) for b in BETAS for w in WEIGHTS]}
    for name, grid in grids.items():
        chosen = {**_choose(grid, validate), "share": share, "whitened": whitened}
        sims = _blended(*sides["test"], chosen["beta"])
        chosen["test"] = score(_queried(sims["qg"], sims["gg"], ids["test_g"], chosen["hubness"]),
                               list(ids["test_q"]), chosen["threshold"])
        out[name] = chosen
    return out


def seed_rows(samples: Sequence, seed: int, image_size: int, kept: dict | None,
              whitened: bool = False) -> dict:
    """Every row of one protocol seed, and the seconds the local similarities took."""
    from retrieval.config import TrainConfig
    from retrieval.data import validation_split, whale_split
    from retrieval.models.embed import embed_images
    from retrieval.models.model import preprocessing_for, zero_shot_model

    split = whale_split(samples, seed)
    validation = validation_split(split.gallery, seed=seed,
                                  new_fraction=TrainConfig().val_new_fraction)
    images = [*split.gallery, *split.queries]
    position = {s.path: i for i, s in enumerate(images)}
    parts = {"test_g": split.gallery, "test_q": split.queries,
             "val_g": validation.gallery, "val_q": validation.queries}
    rows = {name: np.array([position[s.path] for s in part]) for name, part in parts.items()}
    ids = {name: np.array([str(s.identity) for s in part]) for name, part in parts.items()}
    model = zero_shot_model(TrainConfig().backbone)
    vectors, maps = embed_images(model, [s.path for s in images],
                                 preprocessing_for(model, image_size), progress=False, maps=True)
    started = time.time()
    # computed once per side: the zero-shot and the trained rows share the test side's
    sides = ("test", "val") if kept is not None else ("test",)
    local = {side: _local_pairs(maps, rows[f"{side}_q"], rows[f"{side}_g"]) for side in sides}
    out = _zero_shot_rows(vectors, local["test"], rows, ids)
    if kept is not None:
        out.update(_trained_rows(kept, whitened, local, ids))
    return {"rows": out, "seconds": round(time.time() - started, 1),
            "descriptors": list(maps.shape[1:])}


def run(args) -> dict:
    from retrieval.models.checkpoint import load_checkpoint

    from .ablation import _samples
    from .blend_ties import kept_vectors
    from .kept import rule_rows

    samples = _samples(args)
    kept = dict(kept_vectors(args)) if args.keep is not None else {}
    report = Report("local_match", args, args.seeds)
    per_seed = []
    for seed in args.seeds:
        whitened = args.keep is not None and bool(load_checkpoint(
            args.keep / args.variant / f"seed{seed}" / "model.pt").get("whiten"))
        scored = seed_rows(samples, seed, args.image_size, kept.get(seed), whitened)
        per_seed.append({"seed": seed, "seconds": scored["seconds"],
                         "descriptors": scored["descriptors"], **scored["rows"]})
        print(f"seed {seed}: " + ", ".join(
            f"{k} {v['val']:.3f}/{v['test']:.3f}" + (f" (beta {v['beta']:g}, w {v['hubness']:g})"
                                                     if "beta" in v else "")
            for k, v in scored["rows"].items()) + f"; local similarities {scored['seconds']} s",
              flush=True)
    names = [k for k in per_seed[0] if k not in ("seed", "seconds", "descriptors")]
    table_rows = []
    for kind in ("zero-shot", "zero-shot whitened as shipped", "trained"):  # against its pooled search
        mine = [n for n in names if n.startswith(kind + ",")
                or (kind == "zero-shot" and n == "zero-shot index as shipped")]
        if mine and f"{kind}, pooled + hub" in names:
            table_rows += [[name, val, test, " ".join(f"{r[name]['beta']:g}" if "beta" in r[name]
                                                      else "-" for r in per_seed), *counts]
                           for name, val, test, *counts in
                           rule_rows(per_seed, mine, f"{kind}, pooled + hub")]
    title = (f"{args.data}: local matching at {args.image_size}px, seeds "
             f"{' '.join(map(str, args.seeds))} (descriptors {per_seed[0]['descriptors']}); "
             "choose by the validation / leave-one-out column")
    table = format_table(["rule", "val (or LOO) MAP@5", "test MAP@5", "beta per seed",
                          "seeds above pooled + hub", "below"], table_rows, title)
    print(table)
    tag = f"_{args.max_identities}ids" if args.max_identities else ""
    report.write(f"local_match_{Path(str(args.data)).name}{tag}_{args.image_size}px",
                 getattr(args, "out", None), rows=per_seed, table=table)
    return {"local_match": per_seed}
