"""Peer libraries trained on the same images, backbone, image size, augmentation and time budget.

The accuracy (whale protocol) and open-set suites add these peers as rows of their own tables; this
module holds the peer trainers (``bench.peers_suite`` runs them alone). One model for everyone
(``retrieval.models.model.create_model``: timm backbone -> GeM -> Linear + BN neck), batch 16:
  * pytorch-metric-learning: its own ``trainers.MetricLossOnly`` with ``losses.ArcFaceLoss`` (the
    engine's margin and scale);
  * open-metric-learning (OML): its own ``TripletLossWithMiner(AllTripletsMiner)`` and
    ``BalanceSampler`` (8 identities x 2 images), a plain loop as OML's README trains. The sampler
    refuses identities with one image, so OML trains on the identities with two or more. It runs in
    bench/.venv-peers (never a project dependency; see bench/setup_peers.sh), in a subprocess.
Both get AdamW with the engine's learning rates and weight decay but no frozen warm-up and no
schedule (what a plain setup does), train whole epochs until the next one would pass the budget
(the engine's measured training time), and hand back embeddings of the images to score, which
every suite scores with the same code as the engine's rows (peers have no new_whale threshold).
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .common import ROOT, label_array, torch_device, whole_backbone

PEERS_PYTHON = ROOT / "bench" / ".venv-peers" / "bin" / "python"
OML_ENVIRONMENT = (
    "bench/.venv-peers (bench/setup_peers.sh): open-metric-learning installed with --no-deps, plus "
    "gdown, omegaconf (imported by oml.functional.metrics, undeclared), matplotlib, validators; "
    "torch 2.14.1 / timm / pml / faiss / numpy are the project's .venv packages seen through a .pth "
    "file. OML 4.0.0 declares numpy<2.0 (and tensorboard): not honoured, it runs on numpy 2.x here; "
    "a resolving install would have put numpy 1.26.4 beside a torch built for numpy 2")
PEERS = {"pml": "pytorch-metric-learning MetricLossOnly, ArcFace",
         "oml": "open-metric-learning, triplet + BalanceSampler"}


def peer_recipe(config):
    """The engine's recipe as a plain setup runs it: same learning rates and weight decay, no
    frozen warm-up, no schedule (``retrieval.training.recipe``)."""
    from dataclasses import replace

    from retrieval.training.recipe import Recipe

    return replace(Recipe.from_config(whole_backbone(config)), warmup_epochs=0, schedule="constant")


def train_pml(train_samples, eval_paths: Sequence[Path], image_size: int, seed: int,
              budget: float, workers: int = 0, device: str | None = None) -> tuple[np.ndarray, dict]:
    """pytorch-metric-learning's own trainer; returns (embeddings of ``eval_paths``, stats)."""
    import logging

    from pytorch_metric_learning import losses, trainers
    from torch import nn

    from retrieval.training import recipe
    from retrieval.config import TrainConfig
    from retrieval.models.embed import ImageDataset, embed_images
    from retrieval.models.model import ModelConfig, create_model, preprocessing_for
    from retrieval.training.train import seed_everything
    from retrieval.models.transforms import train_transform

    logging.getLogger("PML").setLevel(logging.WARNING)
    config = TrainConfig(seed=seed)
    seed_everything(seed)
    torch_dev = torch_device(device)
    model = create_model(ModelConfig(config.backbone, config.embedding_dim), pretrained=True).to(torch_dev)
    pre = preprocessing_for(model, image_size)
    labels = label_array([s.identity for s in train_samples])
    train_set = ImageDataset([s.path for s in train_samples], train_transform(pre, seed=seed),
                             labels.tolist())
    loss = losses.ArcFaceLoss(int(labels.max()) + 1, config.embedding_dim,
                              margin=config.arcface_margin, scale=config.arcface_scale).to(torch_dev)
    plan = peer_recipe(config)
    groups = recipe.param_groups(model, plan, loss)  # pml wants one optimiser per model part
    optimizers = {
        "trunk_optimizer": recipe.create_optimizer([*recipe.backbone_groups(groups), groups["pool"]],
                                                   plan),
        "embedder_optimizer": recipe.create_optimizer([groups["neck"]], plan),
        "metric_loss_optimizer": recipe.create_optimizer([groups["loss"]], plan),
    }
    started = time.perf_counter()
    epoch_ends: list[float] = []

    def end_of_epoch(trainer) -> bool:
        epoch_ends.append(time.perf_counter() - started)
        last = epoch_ends[-1] - (epoch_ends[-2] if len(epoch_ends) > 1 else 0.0)
        return epoch_ends[-1] + last <= budget

    trainer = trainers.MetricLossOnly(
        models={"trunk": nn.Sequential(model.backbone, model.pool), "embedder": model.neck},
        optimizers=optimizers, batch_size=config.batch_size, loss_funcs={"metric_loss": loss},
        dataset=train_set, data_device=torch_dev, dataloader_num_workers=workers,
        end_of_epoch_hook=end_of_epoch)
    trainer.train(start_epoch=1, num_epochs=10_000)
    seconds = time.perf_counter() - started
    vectors = embed_images(model, eval_paths, pre, progress=False, device=torch_dev)
    return vectors, {"train_seconds": round(seconds, 1), "epochs": len(epoch_ends),
                     "images_seen": len(epoch_ends) * trainer.iterations_per_epoch * config.batch_size}


def train_oml(train_samples, eval_paths: Sequence[Path], image_size: int, seed: int,
              budget: float, workers: int = 0, threads: int = 1,
              eval_labels: Sequence[str] | None = None,
              device: str | None = None) -> tuple[np.ndarray | None, dict]:
    """OML in its own venv (``bench/oml_peer.py``); (None, {"not_run": why}) if it cannot run."""
    if not PEERS_PYTHON.is_file():
        return None, {"not_run": f"{PEERS_PYTHON.relative_to(ROOT)} is missing: create it with "
                                 "bash bench/setup_peers.sh (open-metric-learning must never be a "
                                 "project dependency)"}
    with tempfile.TemporaryDirectory(prefix="bench-oml-") as temp:
        spec = Path(temp) / "spec.json"
        spec.write_text(json.dumps({
            "train": [[str(s.path), s.identity] for s in train_samples],
            "eval": [str(p) for p in eval_paths],
            "eval_labels": list(eval_labels) if eval_labels is not None else None,
            "image_size": image_size, "seed": seed, "budget_s": budget, "workers": workers,
            "threads": threads, "device": str(torch_device(device))}))
        command = [str(PEERS_PYTHON), "-m", "bench.oml_peer", str(spec), temp]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        stats_path, vectors_path = Path(temp) / "stats.json", Path(temp) / "vectors.npy"
        if result.returncode != 0 or not stats_path.is_file():
            tail = result.stderr.strip().splitlines()[-3:]
            return None, {"not_run": f"the OML run failed (exit {result.returncode}): {' | '.join(tail)}"}
        return np.load(vectors_path), {**json.loads(stats_path.read_text()),
                                       "environment": OML_ENVIRONMENT}


def train_peer(name: str, train_samples, eval_paths, image_size: int, seed: int, budget: float,
               workers: int = 0, threads: int = 1, eval_labels=None,
               device: str | None = None) -> tuple[np.ndarray | None, dict]:
    """One peer by key (``PEERS``); a failure is recorded as ``not_run``, never raised."""
    try:
        if name == "pml":
            return train_pml(train_samples, eval_paths, image_size, seed, budget, workers, device)
        return train_oml(train_samples, eval_paths, image_size, seed, budget, workers, threads,
                         eval_labels, device)
    except Exception as err:  # one peer failing must not lose the other rows
        return None, {"not_run": f"{type(err).__name__}: {err}"}


def engine_train_seconds(checkpoint: Path) -> float | None:
    """The engine's training wall time (selection + refit epochs, validation included), summed
    from the run's log.csv: the time budget the peers get."""
    import csv

    log = Path(checkpoint).parent / "log.csv"
    try:
        with log.open() as handle:
            return round(sum(float(r["seconds"]) for r in csv.DictReader(handle)), 1)
    except (OSError, KeyError, ValueError):
        return None
