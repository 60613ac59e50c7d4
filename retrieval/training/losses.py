"""Metric-learning losses by name, all from pytorch-metric-learning.

Classification-style losses (ArcFace, sub-center ArcFace) hold a weight per identity: those
parameters get their own learning rate (``retrieval.training.recipe``). Pair-based losses (triplet,
multi-similarity) learn only from pairs inside a batch, so they come with a miner and need m images
per identity per batch; under DDP both are wrapped so pairs are mined across every rank's batch,
not within each rank's share of it. Their parameters come from the run config
(``TrainConfig.loss_params``); the multi-similarity constants are the paper's (Wang et al., CVPR
2019: alpha 2, beta 50, base 0.5) as pytorch-metric-learning sets them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pytorch_metric_learning import losses, miners
from torch import nn

from ..config import LOSS_NAMES


@dataclass
class LossSpec:
    loss: nn.Module
    miner: nn.Module | None
    pair_based: bool  # True: batches need an m-per-identity sampler


def _arcface(num_classes: int, dim: int, margin: float, scale: float, **_) -> LossSpec:
    loss = losses.ArcFaceLoss(num_classes=num_classes, embedding_size=dim, margin=margin, scale=scale)
    return LossSpec(loss, None, False)


def _subcenter_arcface(num_classes: int, dim: int, margin: float, scale: float, sub_centers: int,
                       **_) -> LossSpec:
    loss = losses.SubCenterArcFaceLoss(num_classes=num_classes, embedding_size=dim, margin=margin,
                                       scale=scale, sub_centers=sub_centers)
    return LossSpec(loss, None, False)


def _triplet(num_classes: int, dim: int, triplet_margin: float, **_) -> LossSpec:
    return LossSpec(losses.TripletMarginLoss(margin=triplet_margin),
                    miners.TripletMarginMiner(margin=triplet_margin, type_of_triplets="semihard"), True)


def _multi_similarity(num_classes: int, dim: int, **_) -> LossSpec:
    return LossSpec(losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5),
                    miners.MultiSimilarityMiner(epsilon=0.1), True)


LOSSES: dict[str, Callable[..., LossSpec]] = {
    "arcface": _arcface,
    "subcenter-arcface": _subcenter_arcface,
    "triplet": _triplet,
    "multi-similarity": _multi_similarity,
}
assert tuple(LOSSES) == LOSS_NAMES


def create_loss(name: str, num_classes: int, embedding_dim: int, margin: float = 28.6,
                scale: float = 30.0, sub_centers: int = 3, triplet_margin: float = 0.1,
                distributed: bool = False) -> LossSpec:
    """The loss (and miner) ``name``; ``distributed``: pair-based ones mine across all ranks."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss '{name}': choose one of {', '.join(LOSSES)}")
    spec = LOSSES[name](num_classes, embedding_dim, margin=margin, scale=scale,
                        sub_centers=sub_centers, triplet_margin=triplet_margin)
    if distributed and spec.pair_based:
        from pytorch_metric_learning.utils import distributed as pml_distributed

        spec = LossSpec(pml_distributed.DistributedLossWrapper(spec.loss),
                        pml_distributed.DistributedMinerWrapper(spec.miner), True)
    return spec
