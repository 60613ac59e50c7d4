"""The gallery audit against known mistakes: inject label swaps and near-duplicates, see how many
the audit ranks at the top.

  python -m bench audit --data orl omniglot dogfacenet --max-identities 300

For each data set (the first ``--max-identities`` identities, images read in place) a gallery is
written as Kaggle's layout (a CSV of labels over the original files, plus re-encoded copies for
the duplicates), with ``--swap`` of its images given another identity's label (pairs of images
of different identities swap labels) and ``--duplicate`` of its images copied again (JPEG at
quality 90, 95 % size), half under the same identity, half under another. The zero-shot model
embeds it (build_index.py, ``--image-size``), ``retrieval.audit`` ranks, and the measure is the
share of injected items in the audit's top list of the same length as the number injected (so
precision = recall), per kind: swapped images among the ``mislabel`` findings, injected pairs
among the ``duplicate`` findings (ranked by similarity, whatever the threshold).
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
    from retrieval.audit import audit_gallery, duplicate_pairs
    from retrieval.data import read_folder_gallery
    from index.store import load_index
    from retrieval.indexing import BuildOptions, run

    samples = read_folder_gallery(data_path(name))
    keep = sorted({s.identity for s in samples})[:args.max_identities]
    samples = [s for s in samples if s.identity in set(keep)]
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as temp:
        folder = Path(temp)
        csv, swapped, duplicates = _inject(samples, folder, args.swap, args.duplicate, args.seed)
        run(BuildOptions(out=str(folder / "index"), gallery="/", labels=str(csv), allow_outside=True,
                         image_size=args.image_size, workers=0, progress=False))
        stored = load_index(folder / "index")
        vectors = stored.vectors()
        findings = audit_gallery(vectors, stored.paths, stored.identities)
        # every neighbour pair ranked by similarity, whatever the threshold; the list is cut below
        ranked = duplicate_pairs(vectors, stored.paths, stored.identities, threshold=-1.0,
                                 candidate_similarity=-1.0)
    mislabel = [f.image for f in findings if f.kind == "mislabel"][:len(swapped)]
    pairs = [frozenset((f.image, f.other_image)) for f in ranked]
    injected_pairs = {frozenset(p) for p in duplicates}
    top_pairs = pairs[:len(injected_pairs)]
    return {"data": name, "images": len(samples), "identities": len(keep),
            "swapped_images": len(swapped), "duplicates": len(duplicates),
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


def run(args) -> dict:
    report = Report("audit", args, seeds=[args.seed])
    rows = [_one(name, args) for name in args.data]
    table = format_table(["data", "images", "identities", "swapped", "swaps in top list",
                          "duplicates", "duplicates in top list"],
                         [[r["data"], r["images"], r["identities"], r["swapped_images"],
                           r["swaps_found_in_top"], r["duplicates"], r["duplicates_found_in_top"]]
                          for r in rows],
                         f"audit: {args.swap:.0%} swapped labels, {args.duplicate:.0%} duplicates, "
                         f"zero-shot model at {args.image_size} px, seed {args.seed}")
    print(table, flush=True)
    report.write("audit", getattr(args, "out", None), results=rows, table=table)
    return {"results": rows}
