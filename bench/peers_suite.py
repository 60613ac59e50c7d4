"""The peer libraries alone against the engine, on the open-set split, one seed.

  python -m bench peers --data orl --image-size 96 --epochs 5

The peers train for the engine's measured training time (``bench.peers``); every row is scored by
the open-set suite's code.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from .common import Report, data_path, format_table, suite_config
from .open_set import evaluate_checkpoint, peer_metrics
from .peers import PEERS, engine_train_seconds


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="orl", help="omniglot | orl | a folder-per-identity path")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--epochs", type=int, default=5, help="the engine's selection epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-s", type=float,
                   help="training seconds for the peers (default: the engine's measured time)")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--skip", nargs="*", default=[], choices=list(PEERS))


def run(args) -> dict:
    from retrieval.data import open_set_split, read_folder_gallery
    from retrieval.training.train import train

    train_samples, test = open_set_split(read_folder_gallery(data_path(args.data)))
    report = Report("peers", args, [args.seed])
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as temp:
        cfg_args = argparse.Namespace(backbone=None, image_size=args.image_size, epochs=args.epochs,
                                      refit=True, workers=args.workers,
                                      device=getattr(args, "device", None))
        checkpoint = train(suite_config(cfg_args, "arcface", args.seed, Path(temp) / "engine"),
                           train_samples)
        seconds = engine_train_seconds(checkpoint)
        rows["engine (retrieval.training.train, ArcFace)"] = {
            **evaluate_checkpoint(checkpoint, test), "train_seconds": seconds, "epochs": args.epochs}
    budget = args.budget_s or seconds
    for key, title in PEERS.items():
        if key not in args.skip:
            rows[title] = peer_metrics(args, key, args.seed, budget, train_samples, test)
    table_rows = [[name] + ([None] * 5 if "error" in r else
                            [r["precision_at_1"], r["mean_average_precision_at_r"],
                             r["train_seconds"], r["epochs"], r.get("images_seen")])
                  for name, r in rows.items()]
    title = (f"{args.data}: open-set split, image {args.image_size}px, seed {args.seed}, "
             f"budget {budget:.0f}s (the engine's {args.epochs} epochs)")
    table = format_table(["peer (open-set test half)", "Recall@1", "MAP@R", "train s", "epochs",
                          "images seen"], table_rows, title)
    table += "".join(f"\n{name}: {r['error']}" for name, r in rows.items() if "error" in r)
    print(table)
    report.write(f"peers_{Path(str(args.data)).name}_{args.image_size}px_{args.epochs}ep",
                 getattr(args, "out", None), data=str(args.data), budget_s=round(budget, 1),
                 rows=rows, table=table)
    return rows
