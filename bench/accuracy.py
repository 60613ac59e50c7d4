"""Accuracy on the whale protocol: MAP@5, mean ± spread over seeds, every method on the same split.

  python -m bench accuracy --data omniglot --seeds 0 1 2 3 4 --image-size 96 --epochs 15

Rows (same seeds, split, backbone and image size for all):
  * constant new_whale, pretrained + GeM (no threshold; a threshold calibrated on the gallery's
    validation carve-out like the engine's; the oracle test threshold): the protocol's reference
    points, as ``retrieval.training.protocol.run_seed`` computes them;
  * softmax classifier: backbone + GeM + Linear over the known identities, cross-entropy, answer =
    top-5 classes, no new_whale (bench/baselines.py);
  * the engine with each loss, without and with its calibrated new_whale threshold: the numbers
    come from ``retrieval.training.protocol.run_seed`` (the code ``train_embed.py --whale-protocol`` runs),
    with ``--epochs`` for the selection stage (the refit stage then trains the selected number);
  * peer libraries (bench/peers.py: pytorch-metric-learning's trainer, open-metric-learning),
    trained on the same gallery images for the engine's ArcFace training time of that seed, their
    embeddings answered through the same ``GalleryIndex`` search (no new_whale: peers have no
    threshold; compare them with the engine's no-threshold rows).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from .common import Report, data_path, format_table, mean_std, pm, suite_config
from .peers import PEERS, engine_train_seconds, train_peer

LOSSES = ("arcface", "subcenter-arcface", "triplet", "multi-similarity")
REFERENCES = {
    "constant_new_whale": "constant new_whale",
    "pretrained_gem": "pretrained + GeM (no fine-tuning)",
    "pretrained_gem_calibrated_threshold": "pretrained + GeM, calibrated threshold",
    "pretrained_gem_oracle_threshold": "pretrained + GeM, oracle test threshold",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="omniglot", help="omniglot | orl | a folder-per-identity path")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--epochs", type=int, default=15,
                   help="selection-stage epochs for the engine (default: the README's 15); the "
                        "softmax baseline trains this many")
    p.add_argument("--warmup-epochs", type=int, default=None,
                   help="frozen-backbone epochs (default: the engine's, capped at epochs - 1)")
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    p.add_argument("--backbone", default=None, help="timm backbone (default: the engine's)")
    p.add_argument("--no-softmax", dest="softmax", action="store_false",
                   help="skip the softmax-classifier baseline")
    p.add_argument("--peer-budget-s", type=float,
                   help="peers' training seconds (default: the engine's ArcFace time that seed)")
    p.add_argument("--peers", nargs="*", default=list(PEERS), choices=list(PEERS),
                   help="peer libraries to train on the same split (default both; none: --peers)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0: one core)")
    p.add_argument("--workdir", help="where checkpoints go (default: a temp dir, deleted after)")


def run(args) -> dict:
    from retrieval.data import read_folder_gallery, whale_split
    from retrieval.training.protocol import run_seed

    from .baselines import top5_classes_map, train_softmax_classifier

    samples = read_folder_gallery(data_path(args.data))
    report = Report("accuracy", args, args.seeds)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-accuracy-"))
    per_seed: list[dict] = []
    try:
        for seed in args.seeds:
            row: dict = {"seed": seed, "train_seconds": {}}
            for loss in args.losses:
                started = time.perf_counter()
                try:
                    result = run_seed(suite_config(args, loss, seed, workdir / loss), samples, seed)
                except Exception as err:  # record it, go on with the other methods
                    row.setdefault("errors", {})[loss] = f"{type(err).__name__}: {err}"
                    print(f"seed {seed} {loss}: FAILED {row['errors'][loss]}", flush=True)
                    shutil.rmtree(workdir / loss, ignore_errors=True)
                    continue
                row["train_seconds"][loss] = round(time.perf_counter() - started, 1)
                if loss == "arcface":
                    row["arcface_train_seconds"] = engine_train_seconds(
                        workdir / loss / f"seed{seed}" / "model.pt")
                for key in REFERENCES:
                    if key in row and abs(row[key] - result[key]) > 1e-9:
                        row.setdefault("reference_mismatch", []).append((loss, key, result[key]))
                    row.setdefault(key, result[key])
                for key in ("seed", "queries", "new_queries", "gallery_images"):
                    row[key] = result[key]
                row[f"{loss}/no_threshold"] = result["engine_no_threshold"]
                row[f"{loss}/threshold"] = result["engine"]
                row[f"{loss}/threshold_value"] = result["threshold"]
                print(f"seed {seed} {loss}: MAP@5 {result['engine']:.3f} (no threshold "
                      f"{result['engine_no_threshold']:.3f}), pretrained+GeM "
                      f"{result['pretrained_gem']:.3f}, {row['train_seconds'][loss]:.0f}s", flush=True)
                shutil.rmtree(workdir / loss, ignore_errors=True)
            split = whale_split(samples, seed)
            if args.softmax:
                classifier = train_softmax_classifier(suite_config(args, "arcface", seed, workdir),
                                                      split.gallery)
                row["softmax"] = top5_classes_map(classifier, split.queries)
                row["train_seconds"]["softmax"] = round(classifier.train_seconds, 1)
                print(f"seed {seed} softmax classifier: MAP@5 {row['softmax']:.3f}", flush=True)
            budget = args.peer_budget_s or row.get("arcface_train_seconds")
            if args.peers and not budget:
                print(f"seed {seed}: peers not run (no arcface run to take the time budget from; "
                      "give --peer-budget-s)", flush=True)
            for peer in args.peers if budget else []:
                _score_peer(args, peer, split, seed, budget, row)
            per_seed.append(row)
            _write(report, args, per_seed)  # partial results survive an interruption
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    summary, table = _write(report, args, per_seed)
    print(table)
    return summary


def _score_peer(args, peer: str, split, seed: int, budget: float, row: dict) -> None:
    """Train one peer on the gallery for ``budget`` s; MAP@5 of its nearest identities."""
    from index import GalleryIndex
    from retrieval.training.evaluate import score

    gallery, queries = split.gallery, split.queries
    vectors, stats = train_peer(peer, gallery, [s.path for s in gallery + queries], args.image_size,
                                seed, budget, args.workers, getattr(args, "threads", 1),
                                device=getattr(args, "device", None))
    row.setdefault("peers", {})[peer] = stats
    if vectors is None:
        print(f"seed {seed} {peer}: NOT RUN {stats['not_run']}", flush=True)
        return
    ranking = GalleryIndex(vectors[:len(gallery)], [s.identity for s in gallery]).search(
        vectors[len(gallery):], 5)
    row[f"peer:{peer}"] = score(ranking, [q.identity for q in queries], None)
    row["train_seconds"][f"peer:{peer}"] = stats["train_seconds"]
    print(f"seed {seed} {peer}: MAP@5 {row[f'peer:{peer}']:.3f} (no threshold), "
          f"{stats['epochs']} epochs in {stats['train_seconds']:.0f}s of {budget:.0f}s", flush=True)


def _columns(args) -> dict[str, str]:
    columns = dict(REFERENCES)
    if args.softmax:
        columns["softmax"] = "softmax classifier, top-5 classes"
    for peer in args.peers:
        columns[f"peer:{peer}"] = f"{PEERS[peer]}, no threshold"
    for loss in args.losses:
        columns[f"{loss}/no_threshold"] = f"engine {loss}, no threshold"
        columns[f"{loss}/threshold"] = f"engine {loss}, calibrated threshold"
    return columns


def _write(report: Report, args, per_seed: list[dict]):
    columns = _columns(args)
    summary = {key: mean_std([r[key] for r in per_seed if key in r]) for key in columns}
    seconds = {}
    for r in per_seed:
        for k, v in r["train_seconds"].items():
            seconds.setdefault(k, []).append(v)
    headers = ["MAP@5 (whale protocol)"] + [f"seed {r['seed']}" for r in per_seed] + \
        ["mean ± std", "s/seed"]
    rows = []
    for key, title in columns.items():
        method = key.split("/")[0]
        secs = mean_std(seconds.get(method, []))
        rows.append([title] + [r.get(key) for r in per_seed] + [pm(summary[key]),
                                                                 f"{secs['mean']:.0f}" if secs["n"] else "-"])
    title = (f"{args.data}: image {args.image_size}px, {args.epochs} selection epochs, seeds "
             f"{' '.join(map(str, args.seeds))} ({len(per_seed)} done); "
             f"s/seed = wall time of that method for one seed (training + scoring; peers: training, "
             f"budget = the engine's ArcFace training time of that seed)")
    table = format_table(headers, rows, title)
    errors: dict[str, set] = {}
    for r in per_seed:
        for loss, message in r.get("errors", {}).items():
            errors.setdefault(f"{loss}: {message}", set()).add(r["seed"])
    for message, seeds in errors.items():
        table += f"\nFAILED (seeds {' '.join(map(str, sorted(seeds)))}) engine {message}"
    name = f"accuracy_{Path(str(args.data)).name}_{args.image_size}px_{args.epochs}ep"
    report.write(name, getattr(args, "out", None), data=str(args.data), per_seed=per_seed,
                 summary=summary, columns=columns, table=table)
    return summary, table
