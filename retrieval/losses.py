"""Metric-learning losses by name, all from pytorch-metric-learning.

Classification-style losses (ArcFace, sub-center ArcFace) hold a weight per identity: those
parameters get their own learning rate. Pair-based losses (triplet, multi-similarity) learn only
from pairs inside a batch, so they come with a miner and need m images per identity per batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pytorch_metric_learning import losses, miners
from torch import nn


@dataclass
class LossSpec:
    loss: nn.Module
    miner: nn.Module | None
    pair_based: bool  # True: batches need an m-per-identity sampler


def _arcface(num_classes: int, dim: int) -> LossSpec:
    # margin in degrees (28.6 deg = 0.5 rad, the paper's value); scale 30 suits small data sets
    loss = losses.ArcFaceLoss(num_classes=num_classes, embedding_size=dim, margin=28.6, scale=30)
    return LossSpec(loss, None, False)


def _subcenter_arcface(num_classes: int, dim: int) -> LossSpec:
    loss = losses.SubCenterArcFaceLoss(num_classes=num_classes, embedding_size=dim, margin=28.6,
                                       scale=30, sub_centers=3)
    return LossSpec(loss, None, False)


def _triplet(num_classes: int, dim: int) -> LossSpec:
    return LossSpec(losses.TripletMarginLoss(margin=0.1),
                    miners.TripletMarginMiner(margin=0.1, type_of_triplets="semihard"), True)


def _multi_similarity(num_classes: int, dim: int) -> LossSpec:
    return LossSpec(losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5),
                    miners.MultiSimilarityMiner(epsilon=0.1), True)


LOSSES: dict[str, Callable[[int, int], LossSpec]] = {
    "arcface": _arcface,
    "subcenter-arcface": _subcenter_arcface,
    "triplet": _triplet,
    "multi-similarity": _multi_similarity,
}


def create_loss(name: str, num_classes: int, embedding_dim: int) -> LossSpec:
    if name not in LOSSES:
        raise ValueError(f"unknown loss '{name}': choose one of {', '.join(LOSSES)}")
    return LOSSES[name](num_classes, embedding_dim)
