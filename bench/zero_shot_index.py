"""The zero-shot index as users get it: ``build_index.py`` without ``--model`` on the whale
protocol's gallery, ``query.py`` on its queries, scored by MAP@5 against their truth.

  python -m bench zero-shot-index --data omniglot --seeds 0 1 2 3 4
  python -m bench zero-shot-index --data dogfacenet --max-identities 300 --seeds 0 1 --image-size 224

Nothing is re-implemented here: each seed's gallery is laid out as a folder per identity
(symbolic links to the shared images), built by ``retrieval.answering.indexing.run`` and queried
by ``retrieval.answering.query.run_query`` with a truth CSV (``new_whale`` for the queries of
unseen identities), once per variant:

* ``default``: what ``build_index.py --gallery DIR`` chooses on the gallery (image size unless
  ``--image-size``, threshold, hubness weight, whitening, local matching);
* ``--no-local``: the same without local matching (the pooled vectors alone).

Per seed: test MAP@5, the choices the index recorded (size, local share, hubness, whitening) and
the seconds of the build and of the queries (one thread).
"""
from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import Report, format_table, mean_std

VARIANTS = {"default": {}, "--no-local": {"local": False}}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="orl", help="omniglot | orl | dogfacenet | a folder path")
    p.add_argument("--max-identities", type=int, help="only the first N identities (sorted by name)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--image-size", type=int,
                   help="build at this size (default: the index chooses, as build_index.py does)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))


def _lay_out(split, folder: Path) -> tuple[Path, Path, Path]:
    """gallery/<identity>/<file> and queries/q<n><ext> as links, and the queries' truth CSV."""
    from retrieval import NEW_WHALE

    gallery, queries = folder / "gallery", folder / "queries"
    for i, sample in enumerate(split.gallery):
        target = gallery / str(sample.identity) / f"g{i:05d}{sample.path.suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.abspath(sample.path), target)
    queries.mkdir()
    known = {str(s.identity) for s in split.gallery}
    truth = folder / "truth.csv"
    with open(truth, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Image", "Id"])
        for i, sample in enumerate(split.queries):
            name = f"q{i:05d}{sample.path.suffix}"
            os.symlink(os.path.abspath(sample.path), queries / name)
            writer.writerow([name, sample.identity if str(sample.identity) in known else NEW_WHALE])
    return gallery, queries, truth


def seed_rows(samples, seed: int, image_size: int | None, variants) -> dict:
    from index.store import hubness_weight, load_index, local_share
    from retrieval.answering.indexing import BuildOptions, run
    from retrieval.answering.query import run_query
    from retrieval.data import whale_split

    split = whale_split(samples, seed)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="zero-shot-index-") as scratch:
        gallery, queries, truth = _lay_out(split, Path(scratch))
        for name in variants:
            out = Path(scratch) / f"index-{name.strip('-')}"
            started = time.time()
            run(BuildOptions(out=str(out), gallery=str(gallery), image_size=image_size,
                             workers=0, progress=False, **VARIANTS[name]))
            built = time.time()
            result = run_query(queries, out, k=5, workers=0, progress=False, truth=truth)
            manifest = load_index(out).manifest
            rows[name] = {"test": round(float(result.evaluation.map5), 5),
                          "image_size": manifest.model["preprocessing"]["image_size"],
                          "local": local_share(manifest.model),
                          "hubness": hubness_weight(manifest.model),
                          "whitened": bool(manifest.model.get("whitening")),
                          "build_s": round(built - started, 1),
                          "query_s": round(time.time() - built, 1)}
    return rows


def run(args) -> dict:
    from .ablation import _samples

    samples = _samples(args)
    report = Report("zero_shot_index", args, args.seeds)
    per_seed = []
    for seed in args.seeds:
        rows = seed_rows(samples, seed, args.image_size, args.variants)
        per_seed.append({"seed": seed, **rows})
        print(f"seed {seed}: " + ", ".join(f"{k} {v['test']:.3f} ({v['image_size']} px, local "
                                           f"{v['local']:g}, build {v['build_s']} s)"
                                           for k, v in rows.items()), flush=True)
    table = render_table(args.data, args.seeds, args.variants, per_seed)
    print(table)
    tag = f"_{args.max_identities}ids" if args.max_identities else ""
    size = f"_{args.image_size}px" if args.image_size else ""
    report.write(f"zero_shot_index_{Path(str(args.data)).name}{tag}{size}",
                 getattr(args, "out", None), rows=per_seed, table=table)
    return {"zero_shot_index": per_seed}


def render_table(data: str, seeds, variants, per_seed: list[dict]) -> str:
    """The suite's table from its per-seed rows (as the JSON keeps them)."""
    table_rows = []
    for name in variants:
        tests = [r[name]["test"] for r in per_seed]
        spread = mean_std(tests)
        table_rows.append([name, f"{spread['mean']:.3f} ± {spread['std']:.3f}",
                           " ".join(f"{t:.3f}" for t in tests),
                           " ".join(str(r[name]["image_size"]) for r in per_seed),
                           " ".join(f"{r[name]['local']:g}" for r in per_seed),
                           f"{np.mean([r[name]['build_s'] for r in per_seed]):.0f}",
                           f"{np.mean([r[name]['query_s'] for r in per_seed]):.0f}"])
    title = (f"{data}: the zero-shot index through build_index + query, seeds "
             f"{' '.join(map(str, seeds))}")
    return format_table(["variant", "test MAP@5 (mean ± sd)", "per seed", "px per seed",
                         "local share", "build s", "query s"], table_rows, title)
