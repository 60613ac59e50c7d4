"""The gallery audit against known mistakes: inject label swaps and near-duplicates, see how many
the audit ranks at the top.

  python -m bench audit --data orl omniglot dogfacenet --max-identities 300

For each data set (the first ``--max-identities`` identities, images read in place) a gallery is
written as Kaggle's layout (a CSV of labels over the original files, plus re-encoded copies for
the duplicates), with ``--swap`` of its images given another identity's label (pairs of images
of different identities swap labels) and ``--duplicate`` of its images copied again (JPEG at
quality 90, 95 % size), half under the same identity, half under another. The zero-shot model
embeds it (build_index.py, ``--image-size``), ``retrieval.answering.audit`` ranks, and the measure is the
share of injected items in the audit's top list of the same length as the number injected (so
precision = recall), per kind: swapped images among the ``mislabel`` findings, injected pairs
among the ``duplicate`` findings (ranked by similarity, whatever the threshold).

``--model cross-fit`` audits with a trained engine model instead, as a user who audits the index
of their trained model does, without the model having seen the images it audits: the identities
are split in two folds (alternate names), an engine model (the default recipe, at
``--image-size``, ``--epochs``, no refit) is trained on one fold's injected labels, and the
other fold's gallery is indexed and audited with it, then the other way round. The zero-shot
model audits the same two fold galleries in the same run, so the rows compare like with like.
"""
from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

from .common import Report, data_path, format_table


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", nargs="+", default=["orl", "omniglot", "dogfacenet"])
    p.add_argument("--max-identities", type=int, default=300)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--swap", type=float, default=0.05, help="share of images given a wrong label")
    p.add_argument("--duplicate", type=float, default=0.05, help="share of images copied again")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", choices=["zero-shot", "cross-fit"], default="zero-shot",
                   help="zero-shot: the untrained backbone; cross-fit: engine models trained on "
                        "the other half of the identities (and zero-shot on the same halves)")
    p.add_argument("--epochs", type=int, default=15, help="training epochs of --model cross-fit")


def _inject(samples, folder: Path, swap: float, duplicate: float, seed: int):
    """Labels CSV with swapped labels, re-encoded duplicate files; returns what was injected."""
    from PIL import Image

    from retrieval.data import load_image

    rng = random.Random(seed)
    labels = {str(s.path): s.identity for s in samples}
    paths = sorted(labels)
    swapped: set[str] = set()
    order = paths[:]
    rng.shuffle(order)
    wanted = round(swap * len(paths) / 2)
    for a in order:
        if len(swapped) >= 2 * wanted:
            break
        b = next((p for p in order if p not in swapped and p != a and labels[p] != labels[a]), None)
        if a in swapped or b is None:
            continue
        labels[a], labels[b] = labels[b], labels[a]
        swapped |= {a, b}
    duplicates: list[tuple[str, str]] = []
    identities = sorted(set(labels.values()))
    for n, original in enumerate(rng.sample([p for p in paths if p not in swapped],
                                            round(duplicate * len(paths)))):
        image = Image.fromarray(load_image(original))
        image = image.resize((max(8, round(image.width * 0.95)), max(8, round(image.height * 0.95))))
        copy = folder / f"dup{n:05d}.jpg"
        image.save(copy, quality=90)
        labels[str(copy)] = labels[original] if n % 2 == 0 else rng.choice(
            [i for i in identities if i != labels[original]])
        duplicates.append((original, str(copy)))
    csv = folder / "labels.csv"
    csv.write_text("Image,Id\n" + "".join(f"{p},{i}\n" for p, i in labels.items()))
    return csv, swapped, duplicates


def _one(name: str, args) -> dict:
    from retrieval.data import read_folder_gallery

    samples = read_folder_gallery(data_path(name))
    keep = sorted({s.identity for s in samples})[:args.max_identities]
    samples = [s for s in samples if s.identity in set(keep)]
    if args.model == "cross-fit":
        return _cross_fit(name, args, samples, len(keep))
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as temp:
        folder = Path(temp)
        csv, swapped, duplicates = _inject(samples, folder, args.swap, args.duplicate, args.seed)
        findings, ranked = _audited(folder / "index", folder, csv, None, args.image_size)
    return {"data": name, "model": "zero-shot", "images": len(samples), "identities": len(keep),
            **_scores(findings, ranked, swapped, duplicates)}


def _audited(index_dir: Path, folder: Path, csv: Path, model: str | None, image_size: int):
    """Index the gallery of ``csv`` with ``model`` (None: zero-shot) and audit it: the findings,
    and every neighbour pair ranked by similarity (the duplicate list, cut by the caller)."""
    from index.store import load_index
    from retrieval.answering.audit import audit_gallery, duplicate_pairs
    from retrieval.answering.indexing import BuildOptions, run

    run(BuildOptions(out=str(index_dir), gallery="/", labels=str(csv), allow_outside=True,
                     model=model, image_size=None if model else image_size, workers=0,
                     progress=False))
    stored = load_index(index_dir)
    vectors = stored.embeddings()  # the model's own, whitening (where chosen) undone
    findings = audit_gallery(vectors, stored.paths, stored.identities)
    ranked = duplicate_pairs(vectors, stored.paths, stored.identities, threshold=-1.0,
                             candidate_similarity=-1.0)
    return findings, ranked


def _scores(findings, ranked, swapped: set[str], duplicates: list[tuple[str, str]]) -> dict:
    """Share of the injected items in the audit's top lists of the injected lengths."""
    mislabel = [f.image for f in findings if f.kind == "mislabel"][:len(swapped)]
    pairs = [frozenset((f.image, f.other_image)) for f in ranked]
    injected_pairs = {frozenset(p) for p in duplicates}
    top_pairs = pairs[:len(injected_pairs)]
    return {"swapped_images": len(swapped), "duplicates": len(duplicates),
            "swaps_found": len(set(mislabel) & swapped),
            "duplicates_found": len(set(top_pairs) & injected_pairs),
            "swaps_found_in_top": round(len(set(mislabel) & swapped) / max(1, len(swapped)), 3),
            "duplicates_found_in_top": round(len(set(top_pairs) & injected_pairs)
                                             / max(1, len(injected_pairs)), 3),
            "mislabel_findings": sum(f.kind == "mislabel" for f in findings),
            "duplicate_findings_at_default_threshold": sum(f.kind == "duplicate" for f in findings),
            "injected_duplicates_at_default_threshold": len(
                {frozenset((f.image, f.other_image)) for f in findings if f.kind == "duplicate"}
                & injected_pairs),
            "lowest_injected_duplicate_correlation": min(
                (f.score for f in ranked if frozenset((f.image, f.other_image)) in injected_pairs),
                default=None)}


def _cross_fit(name: str, args, samples: list, n_identities: int) -> list[dict]:
    """Two folds of identities, each injected on its own (so every swap and duplicate stays
    inside one fold's gallery) and audited by a model trained on the other fold's injected
    gallery; the zero-shot model audits the same fold galleries."""
    import time

    from bench.common import suite_config
    from retrieval.data import read_gallery
    from retrieval.training.train import train

    names = sorted({s.identity for s in samples})
    fold_of = {identity: i % 2 for i, identity in enumerate(names)}
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as temp:
        folds = []
        for fold in (0, 1):
            folder = Path(temp) / f"fold{fold}"
            folder.mkdir()
            mine = [s for s in samples if fold_of[s.identity] == fold]
            folds.append((folder, *_inject(mine, folder, args.swap, args.duplicate,
                                           args.seed + fold)))
        for model_kind in ("zero-shot", "cross-fit"):
            found = {"swaps": 0, "swapped": 0, "dup_hits": 0, "dups": 0, "train_s": 0.0}
            for fold, (folder, csv, swapped, duplicates) in enumerate(folds):
                model = None
                if model_kind == "cross-fit":
                    _, other_csv, _, _ = folds[1 - fold]
                    other = read_gallery("/", other_csv, allow_outside=True)
                    config = suite_config(argparse.Namespace(
                        image_size=args.image_size, epochs=args.epochs, refit=False, workers=0),
                        "arcface", args.seed, folder / "model")
                    started = time.perf_counter()
                    model = str(train(config, other))
                    found["train_s"] += time.perf_counter() - started
                findings, ranked = _audited(folder / f"index-{model_kind}", folder, csv, model,
                                            args.image_size)
                score = _scores(findings, ranked, swapped, duplicates)
                found["swaps"] += score["swaps_found"]
                found["swapped"] += len(swapped)
                found["dup_hits"] += score["duplicates_found"]
                found["dups"] += len(duplicates)
            results.append({"data": name, "model": f"{model_kind}, two folds",
                            "images": len(samples), "identities": n_identities,
                            "swapped_images": found["swapped"], "duplicates": found["dups"],
                            "swaps_found_in_top": round(found["swaps"] / max(1, found["swapped"]), 3),
                            "duplicates_found_in_top": round(found["dup_hits"] / max(1, found["dups"]), 3),
                            "train_s_total": round(found["train_s"], 1)})
    return results


def run(args) -> dict:
    report = Report("audit", args, seeds=[args.seed])
    rows = []
    for name in args.data:
        one = _one(name, args)
        rows.extend(one if isinstance(one, list) else [one])
    table = format_table(["data", "model", "images", "identities", "swapped", "swaps in top list",
                          "duplicates", "duplicates in top list"],
                         [[r["data"], r["model"], r["images"], r["identities"], r["swapped_images"],
                           r["swaps_found_in_top"], r["duplicates"], r["duplicates_found_in_top"]]
                          for r in rows],
                         f"audit: {args.swap:.0%} swapped labels, {args.duplicate:.0%} duplicates, "
                         f"{args.model} at {args.image_size} px, seed {args.seed}")
    print(table, flush=True)
    report.write("audit", getattr(args, "out", None), results=rows, table=table)
    return {"results": rows}
