"""The one training recipe: optimiser groups, frozen-backbone warm-up and learning-rate schedule.

The engine (``retrieval.training.train``), the softmax baseline and the peer libraries in ``bench/`` all take
their optimiser and schedule from here, so a comparison between them measures the method, not a
different recipe; where a peer deliberately trains differently (no warm-up, constant learning rate,
as a plain setup does), that is a ``Recipe`` parameter, not a copy of the code.

* AdamW with one group per part: the pretrained backbone learns slowly (``lr``), the new pooling,
  neck or classifier faster (``head_lr``), a loss's own weights (ArcFace class centres) fastest and
  without weight decay (``loss_lr``).
* The first ``warmup_epochs`` keep the backbone frozen, in eval mode (its ImageNet BatchNorm
  statistics intact), so random new layers do not push large gradients into good features.
* Then cosine decay to 1 % of each group's rate (``schedule="cosine"``), or constant.
* ``layer_decay`` < 1: layer-wise learning-rate decay over the backbone (timm's
  ``param_groups_layer_decay``): its last block learns at ``lr``, each block below at
  ``layer_decay`` times the one above, so generic early features move least.
* ``trainable_blocks`` > 0: after the warm-up only the backbone's last that many blocks (timm's
  fine-grained ``group_matcher`` groups; for EfficientNet the last one holds the head conv) learn,
  the rest keeps its ImageNet weights: partial fine-tuning, for galleries of a few photos per
  identity where updating every layer overwrites general features. 0: the whole backbone learns.
  With ``partial_epochs`` > 0 that lasts so many epochs after the warm-up, then the whole backbone
  learns (gradual unfreezing): selection keeps the best epoch on validation, so a gallery whose
  features only need their top adapted ships a partial epoch, and one that needs every layer
  (line drawings) a later one.
* ``l2_sp`` > 0: L2-SP (Li, Grandvalet & Davoine, ICML 2018): the backbone's weight decay pulls
  towards its ImageNet weights instead of towards zero (``StartingPointPull``), so fine-tuning
  on a few images per identity may move the features only as far as the data pays for.
* ``freeze_bn`` (default on): the backbone's BatchNorm statistics stay ImageNet's after the warm-up
  too. Re-estimating them from batches of 16 new-domain images is what made fine-tuning destroy
  the features on colour photos: even at a backbone rate of 1e-5 validation MAP@5 fell from 0.58
  to 0.37 the epoch the backbone was released, and rose steadily with the statistics frozen.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Iterable, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from ..config import TrainConfig

SCHEDULES = ("cosine", "constant")
FINAL_LR_FRACTION = 0.01


@dataclass(frozen=True)
class Recipe:
    lr: float = 3e-4  # backbone
    head_lr: float = 3e-3  # GeM + neck (+ a classifier head)
    loss_lr: float = 3e-2  # the loss's own weights
    weight_decay: float = 1e-4
    warmup_epochs: int = 1  # epochs with the backbone frozen
    schedule: Literal["cosine", "constant"] = "cosine"
    freeze_bn: bool = True  # keep the backbone's BatchNorm statistics after the warm-up too
    layer_decay: float = 1.0  # backbone learning rate x this per block below the last (1: off)
    trainable_blocks: int = 0  # after the warm-up, only the backbone's last this many blocks learn (0: all)
    partial_epochs: int = 0  # ... for this many epochs, then all of it (0: to the end)
    l2_sp: float = 0.0  # pull of the backbone towards its pretrained weights (0: decay to zero)

    @classmethod
    def from_config(cls, config: "TrainConfig") -> "Recipe":
        """The run config's recipe fields; a run that chooses its depth on validation
        (``trainable_blocks`` a list) gets one recipe per depth (``replace`` the field first)."""
        depths = config.depth_choices()
        if len(depths) > 1:
            raise ValueError(f"one recipe per depth: trainable_blocks {depths} is a choice that "
                             "selection makes (retrieval.training.train)")
        return cls(lr=config.lr, head_lr=config.head_lr, loss_lr=config.loss_lr,
                   weight_decay=config.weight_decay, warmup_epochs=config.warmup_epochs,
                   freeze_bn=config.freeze_bn, layer_decay=config.layer_decay,
                   trainable_blocks=depths[0], partial_epochs=config.partial_epochs,
                   l2_sp=config.l2_sp)


def param_groups(model: nn.Module, recipe: Recipe, loss: nn.Module | None = None,
                 extra_head: Iterable[nn.Parameter] = ()) -> dict[str, dict]:
    """AdamW parameter groups by part: ``backbone``, ``pool``, ``neck`` (+ ``extra_head``, e.g. a
    classifier) and ``loss``. Named so a trainer that wants one optimiser per part (pytorch-metric-
    learning's trunk / embedder / loss) can split them without restating the learning rates.
    With ``layer_decay`` < 1 the backbone is several groups, ``backbone``, ``backbone.1``, ...
    (``backbone_groups`` collects them)."""
    groups = {
        **_backbone_groups(model.backbone, recipe),
        "pool": {"params": list(model.pool.parameters()), "lr": recipe.head_lr},
        "neck": {"params": list(model.neck.parameters()) + list(extra_head), "lr": recipe.head_lr},
    }
    if loss is not None:
        groups["loss"] = {"params": list(loss.parameters()), "lr": recipe.loss_lr, "weight_decay": 0.0}
    return {name: group for name, group in groups.items() if group["params"]}


def _backbone_groups(backbone: nn.Module, recipe: Recipe) -> dict[str, dict]:
    if recipe.l2_sp > 0:  # the pull towards the start replaces the decay towards zero
        return {name: {**group, "weight_decay": 0.0}
                for name, group in _backbone_groups(backbone, replace(recipe, l2_sp=0.0)).items()}
    if recipe.layer_decay >= 1.0:
        return {"backbone": {"params": list(backbone.parameters()), "lr": recipe.lr}}
    from timm.optim import param_groups_layer_decay

    layered = param_groups_layer_decay(backbone, weight_decay=recipe.weight_decay,
                                       layer_decay=recipe.layer_decay)
    return {("backbone" if i == 0 else f"backbone.{i}"):
            {"params": group["params"], "lr": recipe.lr * group["lr_scale"],
             "weight_decay": group["weight_decay"]}
            for i, group in enumerate(reversed(layered))}  # "backbone": the last block, at lr


def backbone_groups(groups: dict[str, dict]) -> list[dict]:
    """The backbone's group(s) of ``param_groups``."""
    return [g for name, g in groups.items() if name == "backbone" or name.startswith("backbone.")]


def create_optimizer(groups: Iterable[dict], recipe: Recipe) -> torch.optim.AdamW:
    return torch.optim.AdamW(list(groups), weight_decay=recipe.weight_decay)


class StartingPointPull:
    """L2-SP's penalty ``strength / 2 * |w - w_start|^2`` on the ``params`` (the backbone), applied
    decoupled as AdamW applies its weight decay (Loshchilov & Hutter, ICLR 2019): after each
    optimiser step every weight moves by ``-lr * strength * (w - w_start)`` at its group's current
    learning rate. Added to the loss instead, Adam would divide the pull by the gradients' running
    scale and it would no longer be a pull of a known strength. ``w_start`` is taken when this is
    built (before any step: the pretrained weights); a frozen weight sits at its start, so it
    feels nothing."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter],
                 strength: float):
        wanted = {id(p) for p in params}
        self.strength = strength
        self.groups = [(group, mine) for group in optimizer.param_groups
                       if (mine := [p for p in group["params"] if id(p) in wanted])]
        self.start = {id(p): p.detach().clone() for _, mine in self.groups for p in mine}

    @torch.no_grad()
    def step(self) -> None:
        for group, params in self.groups:
            rate = group["lr"] * self.strength
            for p in params:
                p.sub_(p - self.start[id(p)], alpha=rate)


def scaler_stepped(scaler: torch.amp.GradScaler, scale_before: float) -> bool:
    """Whether the optimiser step just taken through ``scaler`` happened: on inf/NaN gradients
    GradScaler skips it and lowers its scale. What follows a step (the L2-SP pull) must skip
    with it. A disabled scaler (CPU) always steps."""
    return not scaler.is_enabled() or scaler.get_scale() >= scale_before


def lr_factor(step: int, steps_per_epoch: int, epochs: int, recipe: Recipe) -> float:
    """Multiplier of every group's rate at ``step``: 1 while the backbone is frozen, then cosine
    decay to ``FINAL_LR_FRACTION`` over the remaining steps (or 1 throughout: constant)."""
    if recipe.schedule == "constant":
        return 1.0
    warmup = recipe.warmup_epochs * steps_per_epoch
    if step < warmup:
        return 1.0
    total = max(1, epochs * steps_per_epoch - warmup)
    progress = min(1.0, (step - warmup) / total)
    return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


def create_scheduler(optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int,
                     recipe: Recipe) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per batch."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps_per_epoch, epochs, recipe))


def backbone_frozen(epoch: int, recipe: Recipe) -> bool:
    return epoch < recipe.warmup_epochs


def released_blocks(epoch: int, recipe: Recipe) -> int:
    """How many of the backbone's last blocks learn in ``epoch`` once it is released (0: all)."""
    if recipe.trainable_blocks <= 0:
        return 0
    if recipe.partial_epochs > 0 and epoch >= recipe.warmup_epochs + recipe.partial_epochs:
        return 0
    return recipe.trainable_blocks


def set_backbone_frozen(model: nn.Module, frozen: bool, freeze_bn: bool = False,
                        trainable_blocks: int = 0) -> None:
    """Freeze (no gradients, BatchNorm statistics kept: eval mode) or release the backbone;
    ``freeze_bn`` keeps a released backbone's BatchNorm layers in eval mode (their ImageNet
    statistics; their affine weights still learn); ``trainable_blocks`` > 0 releases only its last
    that many blocks (the others stay as if frozen). Call after ``model.train()``, which would put
    the backbone back in training mode."""
    released = set() if frozen else released_parameters(model.backbone, trainable_blocks)
    for name, parameter in model.backbone.named_parameters():
        parameter.requires_grad_(name in released)
    if frozen:
        model.backbone.eval()
        return
    for module in model.backbone.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if freeze_bn or not any(p.requires_grad for p in module.parameters()):
                module.eval()


def released_parameters(backbone: nn.Module, trainable_blocks: int = 0) -> set[str]:
    """Names of the backbone parameters that learn once it is released: all of them, or those of
    its last ``trainable_blocks`` blocks as timm's fine-grained ``group_matcher`` numbers them (a
    backbone without one releases all)."""
    names = {name for name, _ in backbone.named_parameters()}
    if trainable_blocks <= 0 or not hasattr(backbone, "group_matcher"):
        return names
    from timm.models import group_parameters

    groups = group_parameters(backbone, backbone.group_matcher(coarse=False))
    last = sorted(groups)[-trainable_blocks:]
    return {name for group in last for name in groups[group]} & names
