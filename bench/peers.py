"""Peer libraries on the open-set protocol: same split, backbone, image size and time budget.

  python -m bench peers --data orl --epochs 5

Three trainers, one model (``retrieval.model.create_model``: timm backbone -> GeM -> Linear + BN
neck), the same images and augmentation (``retrieval.transforms.train_transform``), batch 16:
  * engine: ``retrieval.train.train`` with ArcFace, ``--epochs`` selection epochs, refit=False
    (its wall time, validation after every epoch included, is the budget of the two others);
  * pytorch-metric-learning: its own ``trainers.MetricLossOnly`` with ``losses.ArcFaceLoss`` (the
    engine's margin and scale), scored by its own ``testers.GlobalEmbeddingSpaceTester``;
  * open-metric-learning (OML): its own ``TripletLossWithMiner(AllTripletsMiner)`` and
    ``BalanceSampler`` (8 identities x 2 images), a plain loop as OML's README trains; it runs in
    bench/.venv-peers (never a project dependency; see bench/setup_peers.sh), in a subprocess.
Both peers get AdamW with the engine's learning rates and weight decay but no frozen warm-up and no
schedule (what a plain setup does), and train whole epochs until the next one would pass the budget.
Every row is scored the same way: Recall@1 and MAP@R by pml's AccuracyCalculator on the test half.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import ROOT, Report, data_path, format_table

PEERS_PYTHON = ROOT / "bench" / ".venv-peers" / "bin" / "python"
OML_ENVIRONMENT = (
    "bench/.venv-peers (bench/setup_peers.sh): open-metric-learning installed with --no-deps, plus "
    "gdown, omegaconf (imported by oml.functional.metrics, undeclared), matplotlib, validators; "
    "torch 2.14.1 / timm / pml / faiss / numpy are the project's .venv packages seen through a .pth "
    "file. OML 4.0.0 declares numpy<2.0 (and tensorboard): not honoured, it runs on numpy 2.x here; "
    "a resolving install would have put numpy 1.26.4 beside a torch built for numpy 2")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="orl", help="omniglot | orl | a folder-per-identity path")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--epochs", type=int, default=5, help="the engine's selection epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-s", type=float,
                   help="training seconds for the peers (default: the engine's measured time)")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--skip", nargs="*", default=[], choices=["pml", "oml"])


def _pml_peer(args, train_samples, test, budget: float) -> dict:
    """pytorch-metric-learning's own trainer and tester."""
    import logging

    import torch
    from pytorch_metric_learning import losses, testers, trainers
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from torch import nn

    from retrieval.embed import ImageDataset
    from retrieval.model import ModelConfig, create_model, preprocessing_for
    from retrieval.train import TrainConfig
    from retrieval.transforms import eval_transform, train_transform

    from .open_set import METRICS, label_array

    logging.getLogger("PML").setLevel(logging.WARNING)
    config = TrainConfig(seed=args.seed)
    torch.manual_seed(args.seed)
    model = create_model(ModelConfig(config.backbone, config.embedding_dim), pretrained=True)
    pre = preprocessing_for(model, args.image_size)
    labels = label_array(train_samples)
    train_set = ImageDataset([s.path for s in train_samples], train_transform(pre), labels.tolist())
    test_labels = label_array(test)
    test_set = ImageDataset([s.path for s in test], eval_transform(pre), test_labels.tolist())
    trunk = nn.Sequential(model.backbone, model.pool)
    embedder = model.neck
    loss = losses.ArcFaceLoss(int(labels.max()) + 1, config.embedding_dim, margin=28.6, scale=30)
    optimizers = {
        "trunk_optimizer": torch.optim.AdamW([{"params": model.backbone.parameters(), "lr": config.lr},
                                              {"params": model.pool.parameters(), "lr": config.head_lr}],
                                             weight_decay=config.weight_decay),
        "embedder_optimizer": torch.optim.AdamW(embedder.parameters(), lr=config.head_lr,
                                                weight_decay=config.weight_decay),
        "metric_loss_optimizer": torch.optim.AdamW(loss.parameters(), lr=config.loss_lr, weight_decay=0.0),
    }
    started = time.perf_counter()
    epochs: list[float] = []

    def end_of_epoch(trainer) -> bool:
        now = time.perf_counter() - started
        epochs.append(now)
        last = epochs[-1] - (epochs[-2] if len(epochs) > 1 else 0.0)
        return now + last <= budget

    trainer = trainers.MetricLossOnly(
        models={"trunk": trunk, "embedder": embedder}, optimizers=optimizers,
        batch_size=config.batch_size, loss_funcs={"metric_loss": loss}, dataset=train_set,
        data_device=torch.device("cpu"), dataloader_num_workers=args.workers,
        end_of_epoch_hook=end_of_epoch)
    trainer.train(start_epoch=1, num_epochs=10_000)
    seconds = time.perf_counter() - started
    tester = testers.GlobalEmbeddingSpaceTester(
        normalize_embeddings=True, batch_size=64, dataloader_num_workers=0,
        data_device=torch.device("cpu"),
        accuracy_calculator=AccuracyCalculator(include=tuple(METRICS), k="max_bin_count"))
    accuracies = tester.test({"test": test_set}, len(epochs), trunk, embedder,
                             splits_to_eval=[("test", ["test"])])["test"]
    metrics = {key: float(accuracies[f"{key}_level0"]) for key in METRICS}
    return {**metrics, "train_seconds": round(seconds, 1), "epochs": len(epochs),
            "images_seen": len(epochs) * trainer.iterations_per_epoch * config.batch_size,
            "scored_by": "pml GlobalEmbeddingSpaceTester (query = reference, self excluded)"}


def _oml_peer(args, budget: float) -> dict:
    if not PEERS_PYTHON.is_file():
        return {"not_run": f"{PEERS_PYTHON.relative_to(ROOT)} is missing: create it with "
                           "bash bench/setup_peers.sh (open-metric-learning must never be a project "
                           "dependency)"}
    with tempfile.TemporaryDirectory(prefix="bench-oml-") as temp:
        out = Path(temp) / "oml.json"
        command = [str(PEERS_PYTHON), "-m", "bench.oml_peer", "--data", str(args.data),
                   "--image-size", str(args.image_size), "--seed", str(args.seed),
                   "--budget-s", f"{budget:.1f}", "--workers", str(args.workers),
                   "--threads", str(getattr(args, "threads", 1)), "--json-out", str(out)]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if result.returncode != 0 or not out.is_file():
            tail = result.stderr.strip().splitlines()[-3:]
            return {"not_run": f"the OML run failed (exit {result.returncode}): {' | '.join(tail)}"}
        return {**json.loads(out.read_text()), "environment": OML_ENVIRONMENT}


def _engine_images_seen(checkpoint) -> int | None:
    """Training images the engine's selection stage went through (from its log.csv epochs)."""
    import csv

    log = Path(checkpoint).parent / "log.csv"
    try:
        epochs = sum(1 for row in csv.DictReader(log.open()) if row["stage"] == "select")
    except (OSError, KeyError):
        return None
    return epochs * _SELECT_IMAGES.get("n", 0) or None


_SELECT_IMAGES: dict = {}


def run(args) -> dict:
    from retrieval.data import open_set_split, read_folder_gallery
    from retrieval.train import train

    from .open_set import evaluate_checkpoint, train_config

    samples = read_folder_gallery(data_path(args.data))
    train_samples, test = open_set_split(samples)
    report = Report("peers", args, [args.seed])
    from retrieval.data import validation_split
    from retrieval.train import TrainConfig
    batch = TrainConfig().batch_size
    selected = len(validation_split(train_samples, seed=args.seed).gallery)
    _SELECT_IMAGES["n"] = selected // batch * batch  # drop_last batches
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as temp:
        cfg_args = argparse.Namespace(backbone=None, image_size=args.image_size, epochs=args.epochs,
                                      refit=False, workers=args.workers)
        started = time.perf_counter()
        checkpoint = train(train_config(cfg_args, "arcface", args.seed, Path(temp) / "engine"),
                           train_samples)
        seconds = time.perf_counter() - started
        rows["engine (retrieval.train, ArcFace)"] = {
            **evaluate_checkpoint(checkpoint, test), "train_seconds": round(seconds, 1),
            "epochs": args.epochs, "images_seen": _engine_images_seen(checkpoint),
            "scored_by": "AccuracyCalculator on embed_images vectors"}
    budget = args.budget_s or seconds
    print(f"engine: {rows['engine (retrieval.train, ArcFace)']}; peer budget {budget:.0f}s", flush=True)
    if "pml" not in args.skip:
        rows["pytorch-metric-learning MetricLossOnly, ArcFace"] = _pml_peer(args, train_samples, test, budget)
        print(f"pml: {rows['pytorch-metric-learning MetricLossOnly, ArcFace']}", flush=True)
    if "oml" not in args.skip:
        rows["open-metric-learning, triplet + BalanceSampler"] = _oml_peer(args, budget)
        print(f"oml: {rows['open-metric-learning, triplet + BalanceSampler']}", flush=True)
    table_rows = []
    for name, r in rows.items():
        if "not_run" in r:
            table_rows.append([name, None, None, None, None, None])
        else:
            table_rows.append([name, r["precision_at_1"], r["mean_average_precision_at_r"],
                               r["train_seconds"], r["epochs"], r.get("images_seen")])
    title = (f"{args.data}: open-set split, image {args.image_size}px, seed {args.seed}, "
             f"budget {budget:.0f}s (the engine's {args.epochs} epochs)")
    table = format_table(["peer (open-set test half)", "Recall@1", "MAP@R", "train s", "epochs", "images seen"],
                         table_rows, title)
    notes = [f"{name}: NOT RUN: {r['not_run']}" for name, r in rows.items() if "not_run" in r]
    if notes:
        table += "\n" + "\n".join(notes)
    print(table)
    report.write(f"peers_{Path(str(args.data)).name}_{args.image_size}px_{args.epochs}ep", getattr(args, "out", None), data=str(args.data),
                 budget_s=round(budget, 1), rows=rows, table=table)
    return rows
