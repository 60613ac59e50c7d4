"""Training: one ``TrainConfig`` drives the whole run.

Two stages, so the protocol's test queries are never seen before the final score:
  1. *select*: carve validation queries out of the training data (``data.validation_split``),
     train, and after every epoch search the validation queries with the same index code that
     serves users; keep the epoch with the best MAP@5 and the ``new_whale`` threshold that
     maximised it. Given several depths of fine-tuning (``trainable_blocks: [0, 1]``), once
     per depth, keeping the depth whose model validates best.
  2. *refit* (default on): train a fresh model on all the training data exactly as the chosen one
     was trained (same epochs, frozen epochs and learning rate per epoch), and give it the
     calibrated threshold. With 1-3 images per identity, the images lent to validation
     are too many to leave out of the final model.
Each epoch writes ``last.pt`` (resumable) atomically; the result is ``model.pt``.
"""
from __future__ import annotations

import csv
import functools
import logging
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from pytorch_metric_learning.samplers import MPerClassSampler
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from .. import distributed
from ..config import COMPANION_SHARES, TrainConfig, write_config
from ..data import Sample, identities_of, require_identities, validation_split
from ..errors import UserError
from ..models import identity_transforms
from ..models.checkpoint import (
    load_checkpoint,
    load_model,
    model_from_payload,
    save_checkpoint,
    state_fingerprint,
)
from ..models.embed import ImageDataset
from ..models.local_descriptors import gives_maps
from ..models.model import (
    EmbeddingModel,
    ModelConfig,
    Preprocessing,
    create_model,
    interpolate_towards,
    model_spec,
    preprocessing_for,
    pretrained_backbone,
    spec_from_dict,
    untrained_config,
    with_companion,
    with_pretrained_share,
)
from ..models.transforms import seed_worker_transform, train_transform
from ..models.whitening import Whitening, fit_within_identity, whiten
from ..progress import bar
from . import recipe
from .evaluate import (EvalResult, evaluate_blends, evaluate_hubness, evaluate_local,
                       evaluate_queries, evaluate_whitened)
from .losses import LossSpec, create_loss
from .recipe import Recipe

log = logging.getLogger(__name__)


@dataclass
class Selection:
    """What stage 1 decided."""

    best_epoch: int = -1
    best_map5: float = -1.0
    threshold: float | None = None
    history: list[dict] = field(default_factory=list)
    best_fingerprint: str | None = None  # of the best.pt this run wrote
    pretrained_share: float = 0.0  # of the untrained reference blended in (model.blend)
    weight_share: float = 0.0  # of the ImageNet weights interpolated in (model.interpolate_towards)
    shipped_map5: float = -1.0  # validation MAP@5 of the chosen model as shipped (blend, share)
    trainable_blocks: int = 0  # the depth this selection trained (TrainConfig.trainable_blocks)
    finished: list[dict] = field(default_factory=list)  # selections of the depths tried before
    complete: bool = False  # every epoch trained and the weight share chosen: nothing to resume
    hubness: float = 0.0  # weight of the hubness correction in search (index.hubness)
    whiten: bool = False  # an index of the model whitens within identities (index.whitening)
    local: float = 0.0  # share of local matching in an index's scores (index.local_match)
    companion_share: float = 0.0  # of the second network's features (model.with_companion)


class LossHead(nn.Module):
    """Model and loss in one module, so one DDP wrapper keeps all their gradients in sync."""

    def __init__(self, model: EmbeddingModel, spec: LossSpec):
        super().__init__()
        self.model, self.loss, self.miner = model, spec.loss, spec.miner
        self.backbone_frozen = False

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(not self.backbone_frozen and torch.is_grad_enabled()):
            features = self.model.forward_features(images)
        embeddings = self.model.forward_head(features).float()
        tuples = self.miner(embeddings, labels) if self.miner is not None else None
        return self.loss(embeddings, labels, tuples)


class Trainer:
    """One model being trained on one set of samples: epochs, optimiser, schedule, state. Its
    config names one depth (``trainable_blocks`` a number): a choice between depths is made by
    training one ``Trainer`` per depth (``_run_selections``)."""

    def __init__(self, config: TrainConfig, samples: Sequence[Sample], epochs: int,
                 ctx: distributed.Context, model: EmbeddingModel | None = None):
        self.config, self.ctx, self.epochs = config, ctx, epochs
        items = identity_transforms.expand(samples, config.new_identities)
        self.identities = sorted({item.identity for item in items})
        self.model = model or create_model(ModelConfig(config.backbone, config.embedding_dim,
                                                       pool_stages=config.pool_stages),
                                           pretrained=config.pretrained)
        self.preprocessing = preprocessing_for(self.model, config.image_size)
        self.spec = create_loss(config.loss, len(self.identities), self.model.head_dim,
                                distributed=ctx.distributed, **config.loss_params())
        self.head = LossHead(self.model, self.spec).to(ctx.device)
        self.loader = self._loader(items)
        self.recipe = Recipe.from_config(config)
        self.optimizer = recipe.create_optimizer(
            recipe.param_groups(self.model, self.recipe, self.spec.loss).values(), self.recipe)
        self.steps_per_epoch = len(self.loader)
        self.scheduler = recipe.create_scheduler(self.optimizer, self.steps_per_epoch, epochs,
                                                 self.recipe)
        self.scaler = torch.amp.GradScaler(enabled=ctx.device.type == "cuda")
        self.ema = _create_ema(self.model, config.ema_decay)
        self.pull = recipe.StartingPointPull(self.optimizer, self.model.backbone.parameters(),
                                             config.l2_sp) if config.l2_sp > 0 else None
        # the within-identity whitening of the blended-in untrained features, once fitted
        # (``_reference_vectors``): every checkpoint with a blend carries it
        self.reference_whitening: Whitening | None = None
        self.epoch = 0
        self._wrapped: nn.Module | None = None
        self._wrapped_frozen: tuple[bool, int] | None = None

    def _loader(self, samples: Sequence[identity_transforms.TrainItem]) -> DataLoader:
        cfg, ctx = self.config, self.ctx
        index_of = {name: i for i, name in enumerate(self.identities)}
        labels = [index_of[s.identity] for s in samples]
        ops = [s.op for s in samples] if cfg.new_identities != "none" else None
        dataset = ImageDataset([s.path for s in samples],
                               train_transform(self.preprocessing, cfg.flip,
                                               seed=cfg.seed * 1009 + ctx.rank,
                                               strength=cfg.augment,
                                               strokes=cfg.stroke_augment), labels, ops)
        per_rank = max(1, min(cfg.batch_size, len(samples) // ctx.world_size))
        if self.spec.pair_based:
            m = cfg.m_per_identity
            # MPerClassSampler needs m * identities >= the global batch, a multiple of m
            per_rank = min(per_rank, m * len(self.identities) // ctx.world_size)
            per_rank = max(m, per_rank // m * m)
            global_batch = per_rank * ctx.world_size
            length = max(global_batch, len(samples) // global_batch * global_batch)
            base = MPerClassSampler(labels, m, batch_size=global_batch, length_before_new_iter=length)
            sampler = distributed.RankShardSampler(base, per_rank, ctx, cfg.seed)
        else:
            sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank,
                                         shuffle=True, seed=cfg.seed, drop_last=True)
        # drop_last: BatchNorm in the neck cannot normalise a batch of one
        return DataLoader(dataset, batch_size=per_rank, sampler=sampler, drop_last=True,
                          num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
                          worker_init_fn=seed_worker_transform,
                          pin_memory=ctx.device.type == "cuda")

    def _module_for(self, frozen: bool, blocks: int) -> nn.Module:
        """The (DDP-wrapped, when distributed) module; rebuilt when the frozen set changes,
        since DDP fixes the parameters it syncs at construction."""
        if self._wrapped is None or self._wrapped_frozen != (frozen, blocks):
            recipe.set_backbone_frozen(self.model, frozen, trainable_blocks=blocks)
            self.head.backbone_frozen = frozen
            self._wrapped = self.head
            if self.ctx.distributed:
                ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
                self._wrapped = DistributedDataParallel(self.head, device_ids=ids)
            self._wrapped_frozen = (frozen, blocks)
        return self._wrapped

    def train_epoch(self) -> float:
        """One pass over the data; returns the mean loss (averaged over ranks)."""
        frozen = recipe.backbone_frozen(self.epoch, self.recipe)
        blocks = recipe.released_blocks(self.epoch, self.recipe)
        module = self._module_for(frozen, blocks)
        self.head.train()
        recipe.set_backbone_frozen(self.model, frozen, self.recipe.freeze_bn, blocks)  # after train()
        if self.ctx.device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)
        self.loader.sampler.set_epoch(self.epoch)
        total, count = 0.0, 0
        batches = bar(self.loader, self.ctx.is_main, desc=f"epoch {self.epoch + 1}/{self.epochs}",
                      unit="batch", leave=False)
        for images, labels in batches:
            images = images.to(self.ctx.device, non_blocking=True)
            labels = labels.to(self.ctx.device, non_blocking=True)
            with torch.autocast(self.ctx.device.type, enabled=self.ctx.device.type == "cuda"):
                loss = module(images, labels)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            scale = self.scaler.get_scale() if self.pull is not None else 1.0
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.pull is not None and recipe.scaler_stepped(self.scaler, scale):
                self.pull.step()  # at this step's rate, before the scheduler moves it
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update(self.model, step=self.scheduler.last_epoch)
            total, count = total + float(loss.detach()), count + 1
            batches.set_postfix(loss=f"{total / count:.3f}")
        self.epoch += 1
        return distributed.mean_across_ranks(self.ctx, total / max(count, 1))

    @functools.cached_property
    def imagenet_backbone(self) -> nn.Module:
        """The untouched ImageNet backbone, built once and outside the run's random stream (timm
        draws random initial weights before the pretrained ones replace them): the reference a
        blend adds and the start a weight share moves back towards."""
        with torch.random.fork_rng(devices=[]):
            return pretrained_backbone(self.config.backbone).to(self.ctx.device).eval()

    @functools.cached_property
    def companion_backbone(self) -> nn.Module:
        """The untouched ImageNet backbone of ``config.companion`` (the second network a chosen
        companion share adds), built once and outside the run's random stream."""
        with torch.random.fork_rng(devices=[]):
            return pretrained_backbone(self.config.companion).to(self.ctx.device).eval()

    @property
    def shipped_model(self) -> EmbeddingModel:
        """The weights that are validated and shipped: the moving average when there is one."""
        return self.model if self.ema is None else self.ema.module

    def state(self) -> dict:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "loss_state": self.spec.loss.state_dict(), "scaler": self.scaler.state_dict(),
                 "epoch": self.epoch}
        if self.ema is not None:
            state["ema"] = _plain_state(self.ema.module)
        return state

    def load_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.spec.loss.load_state_dict(state["loss_state"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.epoch = state["epoch"]


EMA_WARMUP_POWER = 2 / 3


def _create_ema(model: EmbeddingModel, decay: float):
    """timm's weight EMA with its decay warm-up (``1 - (1 + step)^(-2/3)``, capped at ``decay``):
    a run of a few hundred steps averages its recent steps, not the random neck it started
    from. None when ``decay`` is 0 (off)."""
    if not decay:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay, use_warmup=True, warmup_power=EMA_WARMUP_POWER)


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def checkpoint_payload(trainer: Trainer, threshold: float | None, stage: str,
                       metrics: dict | None = None, raw: bool = False,
                       pretrained_share: float = 0.0, weight_share: float = 0.0,
                       hubness: float = 0.0, whiten: bool = False, local: float = 0.0,
                       companion_share: float = 0.0) -> dict:
    """A checkpoint of the shipped weights (the EMA's, when on), moved towards the ImageNet
    weights by ``weight_share`` and with the untrained reference blended in at
    ``pretrained_share``; ``raw``: the weights being trained, which a resumed run continues from
    (``last.pt``). ``whiten``: an index of this model whitens its gallery and queries within
    identities, a map fitted on its own gallery (chosen on validation: ``_choose_whitening``);
    ``local``: the share of local matching an index of it re-scores with (``_choose_local``);
    ``companion_share``: of ``config.companion``'s untrained features beside it
    (``_choose_companion``)."""
    model = trainer.model if raw else trainer.shipped_model
    if not raw and weight_share:  # the ImageNet backbone is built only where it is needed
        model = interpolate_towards(model, trainer.imagenet_backbone, weight_share)
    if not raw and pretrained_share:
        model = with_pretrained_share(model, pretrained_share, trainer.imagenet_backbone,
                                      trainer.reference_whitening)
    if not raw and companion_share:
        model = with_companion(model, companion_share, trainer.companion_backbone,
                               trainer.config.companion)
    state_dict = _plain_state(model)
    return {**model_spec(model, trainer.preprocessing),
            "state_dict": state_dict, "fingerprint": state_fingerprint(state_dict),
            "threshold": threshold, "hubness": hubness, "whiten": whiten,
            **({"local": local} if local else {}),
            "identities": trainer.identities,
            "train_config": asdict(trainer.config), "stage": stage, "epoch": trainer.epoch,
            "metrics": metrics or {}}


class EpochLog:
    """``log.csv``: one row per epoch, readable in a spreadsheet."""

    COLUMNS = ["stage", "trainable_blocks", "epoch", "train_loss", "val_map5",
               "val_map5_no_threshold", "threshold", "pretrained_share", "val_map5_blended",
               "lr_backbone", "seconds"]

    def __init__(self, path: Path, enabled: bool, append: bool):
        """``append`` continues the log of a resumed run; otherwise a fresh log is started."""
        self.path, self.enabled = path, enabled
        if enabled and not (append and path.exists()):
            with path.open("w", newline="") as handle:
                csv.writer(handle).writerow(self.COLUMNS)

    def write(self, **row) -> None:
        if self.enabled:
            with self.path.open("a", newline="") as handle:
                csv.writer(handle).writerow([row.get(c, "") for c in self.COLUMNS])


def _run_selection(config: TrainConfig, samples: Sequence[Sample], ctx: distributed.Context,
                   out: Path, epoch_log: EpochLog, resume: dict | None,
                   run_config: TrainConfig, best_path: Path,
                   finished: Sequence[Selection] = ()) -> Selection:
    """Stage 1 for one depth (``config.trainable_blocks``, a number): train on the gallery part
    of the validation split, keep the best epoch in ``best_path``. ``run_config``: the run's own
    config, which ``last.pt`` keeps so a resumed run makes the same choices; ``finished``: the
    selections of the depths tried before this one (resumable too)."""
    split = validation_split(samples, seed=config.seed, new_fraction=config.val_new_fraction)
    if not split.queries and ctx.is_main:
        log.warning("no validation queries (every identity has one image and "
                    "--val-new-fraction is 0): the last epoch is kept, with no new_whale threshold")
    require_identities(split.gallery, 2, "training after the validation carve-out")
    if ctx.is_main:
        log.info("select: %d training images of %d identities; %d validation queries "
                 "(%d pseudo-new)", len(split.gallery), len(identities_of(split.gallery)),
                 len(split.queries), sum(q.identity == "new_whale" for q in split.queries))
    trainer = Trainer(config, split.gallery, config.epochs, ctx)
    selection = Selection(trainable_blocks=config.trainable_blocks,
                          finished=[asdict(done) for done in finished])
    if resume is not None:
        _restore(trainer, resume)
        selection = Selection(**resume["selection"])
    reference = None
    if ctx.is_main and split.queries and config.blend_pretrained and config.pretrained:
        reference = _reference_vectors(trainer, split)
    while trainer.epoch < config.epochs:
        started = time.time()
        loss = trainer.train_epoch()
        row = {"stage": "select", "trainable_blocks": config.trainable_blocks,
               "epoch": trainer.epoch, "train_loss": round(loss, 5),
               "lr_backbone": trainer.scheduler.get_last_lr()[0]}
        if ctx.is_main and not split.queries:  # nothing to validate on: keep the last epoch
            selection.best_epoch = trainer.epoch
            selection.best_fingerprint = _save_best(trainer, best_path, None, {})
        elif ctx.is_main:
            results = evaluate_blends(trainer.shipped_model, trainer.preprocessing, split.gallery,
                                      split.queries, device=ctx.device, progress=False,
                                      reference=reference, shares=BLEND_SHARES)
            result, blended = results[0], _best_share(results)
            row.update(val_map5=round(result.map5, 5), threshold=round(blended.threshold, 5),
                       val_map5_no_threshold=round(result.map5_no_threshold, 5),
                       pretrained_share=blended.pretrained_share,
                       val_map5_blended=round(blended.map5, 5))
            # ties go to the later epoch: where validation cannot tell epochs apart (a small
            # carve-out, saturated), more training is the recipe's prior, not the first epoch
            # (bench/README.md, "Ties go to more training and to the even blend")
            if result.map5 >= selection.best_map5:
                selection.best_epoch, selection.best_map5 = trainer.epoch, result.map5
                selection.threshold = blended.threshold
                selection.pretrained_share = blended.pretrained_share
                selection.shipped_map5 = blended.map5
                selection.best_fingerprint = _save_best(trainer, best_path, blended.threshold,
                                                        {"val_map5": blended.map5,
                                                         "val_map5_trained": result.map5},
                                                        blended.pretrained_share)
        if ctx.is_main:
            row["seconds"] = round(time.time() - started, 1)
            selection.history.append(row)
            epoch_log.write(**row)
            blend_note = (f"; blended with untrained share {row['pretrained_share']}: "
                          f"{row['val_map5_blended']}" if reference is not None else "")
            depth_note = ("" if len(run_config.depth_choices()) == 1 else
                          f" (last {config.trainable_blocks} blocks trainable)"
                          if config.trainable_blocks else " (whole backbone trainable)")
            log.info("select epoch %d/%d%s  loss %.4f  val MAP@5 %s (no threshold %s%s, threshold "
                     "%s)  %.0fs", trainer.epoch, config.epochs, depth_note, loss,
                     row.get("val_map5", "-"),
                     row.get("val_map5_no_threshold", "-"), blend_note, row.get("threshold", "-"),
                     row["seconds"])
            save_checkpoint(out / "last.pt", {**checkpoint_payload(trainer, None, "select", raw=True),
                                              "train_config": asdict(run_config),
                                              "trainer": trainer.state(),
                                              "selection": asdict(selection)})
        distributed.barrier(ctx)
    if ctx.is_main and split.queries and config.interpolate_pretrained and config.pretrained:
        with torch.random.fork_rng(devices=[]):  # embedding draws seeds: keep the refit's stream
            _choose_weight_share(trainer.imagenet_backbone, split, selection, best_path,
                                 ctx.device)
    selection.complete = True
    if ctx.is_main:  # a run resumed from here goes straight on to the next depth or the refit
        last = load_checkpoint(out / "last.pt")
        save_checkpoint(out / "last.pt", {**last, "selection": asdict(selection)})
    return distributed.broadcast(ctx, selection)


def _run_selections(config: TrainConfig, samples: Sequence[Sample], ctx: distributed.Context,
                    out: Path, epoch_log: EpochLog,
                    resume: dict | None) -> tuple[TrainConfig, Selection]:
    """Stage 1 once per depth of ``config.trainable_blocks`` (one number: once); returns the
    config with the chosen depth and its selection, whose model is ``best.pt``.

    Each depth starts from the run's seed, so it trains exactly what a run with that depth alone
    would, and the refit continues the chosen depth's random stream: choosing between depths
    changes which model ships, never the models themselves. The depth whose model scores best
    on validation as shipped (blend and weight share included) wins, the first listed among
    equals. Each depth's model stays beside it as ``best_blocks{N}.pt``."""
    depths = config.depth_choices()
    current = Selection(**resume["selection"]) if resume is not None else None
    finished = [Selection(**done) for done in current.finished] if current is not None else []
    streams: dict[int, tuple] = {}
    for depth in depths:
        if any(done.trainable_blocks == depth for done in finished):
            continue  # tried before the run was interrupted
        resumes_here = current is not None and (len(depths) == 1
                                                or current.trainable_blocks == depth)
        if resumes_here and current.complete:
            selection = current
        else:
            if not resumes_here:
                seed_everything(config.seed)
            selection = _run_selection(replace(config, trainable_blocks=depth), samples, ctx,
                                       out, epoch_log, resume if resumes_here else None, config,
                                       _best_path(out, depth, len(depths)), finished)
            streams[depth] = _random_streams()
        finished.append(replace(selection, finished=[]))
    chosen = _best_depth(finished)
    if len(depths) > 1:
        if ctx.is_main:
            log.info("validation MAP@5 as shipped by trainable blocks (0: the whole backbone): "
                     "%s; keeping %d", {d.trainable_blocks: round(d.shipped_map5, 5)
                                        for d in finished}, chosen.trainable_blocks)
            save_checkpoint(out / "best.pt",
                            load_checkpoint(_best_path(out, chosen.trainable_blocks, len(depths))))
        distributed.barrier(ctx)
    if config.hubness or config.whiten_output or config.local_match or config.companion:
        chosen = _with_search_choices(config, samples, ctx, out, chosen)
    if chosen.trainable_blocks in streams:
        _restore_random_streams(streams[chosen.trainable_blocks])
    return replace(config, trainable_blocks=chosen.trainable_blocks), chosen


def _with_search_choices(config: TrainConfig, samples: Sequence[Sample],
                         ctx: distributed.Context, out: Path, chosen: Selection) -> Selection:
    """How an index searches the model chosen (``best.pt``), after the depth: the share of a
    companion network first (it changes the vectors the rest search), the hubness
    correction weight, then whether to whiten (with its own weight). More choices on top of
    the others, not a grid searched jointly with them (choosing the weight per depth let a
    small validation gain flip the depth on dogs, seed 0, and test lost 0.02). Outside the
    run's random stream, so the refit trains what it would without them."""
    if ships_imagenet_features(chosen, config):
        log.info("the chosen model ships the ImageNet features alone (untrained share 1): its "
                 "search is calibrated after the refit, by leave-one-out over all the images")
        return chosen
    if ctx.is_main:
        split = validation_split(samples, seed=config.seed, new_fraction=config.val_new_fraction)
        if split.queries:
            with torch.random.fork_rng(devices=[]):
                if config.companion:
                    _choose_companion(split, chosen, out / "best.pt", ctx.device,
                                      config.companion)
                if config.hubness:
                    _choose_hubness(split, chosen, out / "best.pt", ctx.device)
                if config.whiten_output:
                    _choose_whitening(split, samples, chosen, out / "best.pt", ctx.device,
                                      config.hubness, config.seed)
                if config.local_match:
                    _choose_local(split, samples, chosen, out / "best.pt", ctx.device,
                                  config.hubness, config.seed)
    return distributed.broadcast(ctx, chosen)


def _best_path(out: Path, depth: int, n_depths: int) -> Path:
    """Where a selection keeps its best model: ``best.pt``, or one file per depth tried."""
    return out / ("best.pt" if n_depths == 1 else f"best_blocks{depth}.pt")


def _best_depth(selections: Sequence[Selection]) -> Selection:
    """The selection scoring best on validation as shipped; the first among equals (``max``
    keeps the first of equal items)."""
    return max(selections, key=lambda selection: selection.shipped_map5)


def _random_streams() -> tuple:
    """The state of every random source ``seed_everything`` seeds."""
    return random.getstate(), np.random.get_state(), torch.random.get_rng_state()


def _restore_random_streams(streams: tuple) -> None:
    random.setstate(streams[0])
    np.random.set_state(streams[1])
    torch.random.set_rng_state(streams[2])


WEIGHT_SHARES = (0.25, 0.5, 0.75, 1.0)  # shares of the ImageNet weights selection tries


def _choose_weight_share(start: nn.Module, split, selection: Selection, best_path: Path,
                         device: torch.device) -> None:
    """``interpolate_pretrained``: move the chosen model's backbone weights back towards the
    ImageNet ones by each of ``WEIGHT_SHARES`` and keep the share that scores strictly best on
    validation (with its re-calibrated threshold), rewriting ``best.pt``; a tie keeps the model
    as trained. ``start``: the ImageNet backbone the training began from. Like the blend, the
    epoch is chosen first and the share for that epoch only."""
    model, preprocessing, payload = load_model(best_path)
    shares = (0.0, *WEIGHT_SHARES)
    candidates = [interpolate_towards(model, start, share) for share in shares]
    results = [evaluate_queries(candidate, preprocessing, split.gallery, split.queries,
                                device=device, progress=False) for candidate in candidates]
    log.info("validation MAP@5 with the backbone moved towards its ImageNet weights, by share: "
             "%s", {share: round(r.map5, 5) for share, r in zip(shares, results)})
    best = _best_result(results)
    chosen = next(i for i, result in enumerate(results) if result is best)
    if chosen == 0:
        return
    share, candidate = shares[chosen], candidates[chosen]
    state_dict = _plain_state(candidate)
    payload = {**payload, "state_dict": state_dict, "fingerprint": state_fingerprint(state_dict),
               "threshold": best.threshold,
               "metrics": {**payload["metrics"], "val_map5": best.map5, "weight_share": share}}
    save_checkpoint(best_path, payload)
    selection.weight_share, selection.threshold = share, best.threshold
    selection.shipped_map5 = best.map5
    selection.best_fingerprint = payload["fingerprint"]


BLEND_SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)  # untrained shares selection tries (blend_pretrained)


def _choose_companion(split, selection: Selection, best_path: Path, device: torch.device,
                      name: str) -> None:
    """``companion``: score the validation carve-out with the chosen model's vectors beside
    the untrained ImageNet features of the network ``name`` at each of ``COMPANION_SHARES``
    of the cosine (``model.blend``), and keep a share only where it scores strictly better
    than the model alone; rewrites ``best.pt`` then, companion weights included. Two networks
    trained apart make different mistakes (bench/README.md, "Two networks side by side"). A
    model that already carries a companion (a resumed run) keeps it."""
    model, preprocessing, payload = load_model(best_path)
    if model.companion is not None:
        return
    backbone = pretrained_backbone(name).to(device).eval()
    reference = tuple(_embed_untrained(backbone, name, preprocessing,
                                       (split.gallery, split.queries), device))
    results = evaluate_blends(model, preprocessing, split.gallery, split.queries, device=device,
                              progress=False, reference=reference, shares=COMPANION_SHARES)
    log.info("validation MAP@5 with %s's untrained features beside, by share: %s", name,
             {r.pretrained_share: round(r.map5, 5) for r in results})
    best, alone = _best_result(results), [r.map5 for r in results if not r.pretrained_share]
    if not best.pretrained_share or (alone and best.map5 <= alone[0]):
        return
    payload = _with_companion_payload(model, preprocessing, payload, best.pretrained_share,
                                      backbone, name)
    payload = {**payload, "threshold": best.threshold,
               "metrics": {**payload["metrics"], "val_map5": best.map5}}
    save_checkpoint(best_path, payload)
    selection.companion_share, selection.threshold = best.pretrained_share, best.threshold
    selection.shipped_map5, selection.best_fingerprint = best.map5, payload["fingerprint"]


def _with_companion_payload(model: EmbeddingModel, preprocessing: Preprocessing, payload: dict,
                            share: float, backbone: nn.Module, name: str) -> dict:
    """``payload`` (a checkpoint of ``model``) rewritten for ``model`` with ``name``'s
    untrained features (``backbone``) beside it at ``share``: spec, weights, fingerprint."""
    joined = with_companion(model, share, backbone, name)
    state_dict = _plain_state(joined)
    return {**payload, **model_spec(joined, preprocessing), "state_dict": state_dict,
            "fingerprint": state_fingerprint(state_dict),
            "metrics": {**payload.get("metrics", {}), "companion_share": share}}


def _choose_hubness(split, selection: Selection, best_path: Path, device: torch.device) -> None:
    """``hubness``: search the validation carve-out with the chosen model (as shipped) at each
    of ``index.hubness.WEIGHTS`` and keep the weight scoring best with its re-calibrated
    threshold, the first among equals in ``WEIGHTS``' order (ties go to 0.25, not to plain
    cosine: ``index.hubness``); rewrites ``best.pt`` where it changes.
    Chosen last, for the model already chosen: one more choice, not a joint grid."""
    from index.hubness import WEIGHTS

    model, preprocessing, payload = load_model(best_path)
    results = evaluate_hubness(model, preprocessing, split.gallery, split.queries, WEIGHTS,
                               device=device, progress=False)
    log.info("validation MAP@5 by hubness correction weight: %s",
             {weight: round(r.map5, 5) for weight, r in zip(WEIGHTS, results)})
    best = _best_result(results)
    weight = WEIGHTS[results.index(best)]
    if not weight:
        return
    # scored in the plain space: a whitening chosen before (a resumed run) is chosen again after
    payload = {**payload, "hubness": weight, "threshold": best.threshold, "whiten": False,
               "metrics": {**payload["metrics"], "val_map5": best.map5, "hubness": weight}}
    save_checkpoint(best_path, payload)
    selection.hubness, selection.threshold, selection.shipped_map5 = weight, best.threshold, best.map5
    selection.whiten = False


def _choose_whitening(split, samples: Sequence[Sample], selection: Selection, best_path: Path,
                      device: torch.device, hubness: bool, seed: int) -> None:
    """``whiten_output``: score the validation carve-out with gallery and queries whitened
    within identities (each fold of queries through a map fitted on the training images
    without it: ``evaluate.evaluate_whitened``) at each hubness weight, and whiten only where
    that scores strictly better than the plain search already chosen; rewrites ``best.pt``
    then. Measured at 160 px, seeds 0-4 (bench/README.md, "Ties go to the correction"): chosen
    on 4 of 5 Omniglot seeds (test MAP@5 0.668 -> 0.688), on no ORL or dogs seed, where
    validation scored it at or below plain."""
    from index.hubness import WEIGHTS

    model, preprocessing, payload = load_model(best_path)
    weights = WEIGHTS if hubness else (0.0,)
    results = evaluate_whitened(model, preprocessing, split.gallery, split.queries, samples,
                                weights, seed=seed, device=device, progress=False)
    log.info("validation MAP@5 whitened within identities, by hubness weight: %s (plain: %.5f)",
             {weight: round(r.map5, 5) for weight, r in zip(weights, results)},
             selection.shipped_map5)
    best = _best_result(results)
    if best.map5 <= selection.shipped_map5:
        return
    weight = weights[results.index(best)]
    payload = {**payload, "whiten": True, "hubness": weight, "threshold": best.threshold,
               "metrics": {**payload["metrics"], "val_map5": best.map5, "hubness": weight,
                           "whiten": True}}
    save_checkpoint(best_path, payload)
    selection.whiten, selection.hubness, selection.threshold = True, weight, best.threshold
    selection.shipped_map5 = best.map5


def _choose_local(split, samples: Sequence[Sample], selection: Selection, best_path: Path,
                  device: torch.device, hubness: bool, seed: int) -> None:
    """``local_match``: score the validation carve-out searched as an index re-scoring with
    the model's local descriptors (``evaluate.evaluate_local``: every share and hubness
    weight, whitened fold by fold where the model searches whitened), and keep local matching
    only where it scores strictly better than the search already chosen; rewrites ``best.pt``
    then. The descriptors are the untrained reference's stride-16 map where the model blends
    one in, else its own trained backbone's (``EmbeddingModel.forward_with_maps``); a model
    that pools no stage before its final map has none (``local_descriptors.gives_maps``)."""
    from index.hubness import WEIGHTS

    model, preprocessing, payload = load_model(best_path)
    if not gives_maps(model):
        return
    weights = WEIGHTS if hubness else (0.0,)
    results = evaluate_local(model, preprocessing, split.gallery, split.queries, weights,
                             fitted_on=samples if selection.whiten else None, seed=seed,
                             device=device, progress=False)
    log.info("validation MAP@5 with local matching, by share and hubness weight: %s "
             "(without: %.5f)", {(share, weight): round(r.map5, 5) for share, weight, r in results},
             selection.shipped_map5)
    best = _best_result([r for _, _, r in results])
    share, weight, _ = results[[r for _, _, r in results].index(best)]
    if best.map5 <= selection.shipped_map5:
        return
    payload = {**payload, "local": share, "hubness": weight, "threshold": best.threshold,
               "metrics": {**payload["metrics"], "val_map5": best.map5, "hubness": weight,
                           "local": share}}
    save_checkpoint(best_path, payload)
    selection.local, selection.hubness, selection.threshold = share, weight, best.threshold
    selection.shipped_map5 = best.map5


def _best_result(results: Sequence[EvalResult]) -> EvalResult:
    """The best result by validation MAP@5 with its threshold, the first listed among equals
    (``max`` keeps the first of equal items): a weight share, hubness weight or whitening is
    kept only where it scores strictly better than what comes first. (Breaking ties by MAP@5
    without threshold instead picked blends on ORL that then lost on test.)

    The epoch itself is chosen on the trained embedding alone (share 0), as without blending,
    and the blend share for that epoch only (``_best_share``): one choice on top of the usual
    one, not a grid searched jointly, so a small validation set is not over-fitted (on ORL, 40
    validation queries, a joint search picked early epochs whose blend tied with later,
    better-trained ones)."""
    return max(results, key=lambda result: result.map5)


def _best_share(results: Sequence[EvalResult]) -> EvalResult:
    """The blend share scoring best on validation (``_best_result``); among equals the share
    nearest 1/2, the smaller of two as near. A small carve-out often cannot tell shares apart
    (ORL: 22-26 queries, MAP@5 1.000 at several shares); the even blend is the safer pick for
    people training never saw, since it keeps half of the ImageNet features' similarity
    (bench/README.md, "Ties go to more training and to the even blend")."""
    return max(results, key=lambda r: (r.map5, -abs(r.pretrained_share - 0.5),
                                       -r.pretrained_share))


def _reference_vectors(trainer: Trainer, split) -> tuple:
    """The untrained reference's vectors of the validation gallery and queries: computed once,
    since that model never changes, by the trainer's one ImageNet backbone + GeM (the reference
    a chosen blend ships). With ``whiten_pretrained`` both are whitened by the map
    ``_fit_whitening`` fits on the gallery: what is validated is what ships."""
    gallery, queries = _untrained_vectors(trainer, (split.gallery, split.queries))
    fitted = _fit_whitening(trainer, gallery, split.gallery)
    if fitted is None:
        return gallery, queries
    return whiten(gallery, *fitted), whiten(queries, *fitted)


def _untrained_vectors(trainer: Trainer, parts: Sequence[Sequence[Sample]]) -> list[np.ndarray]:
    """Each part embedded by the trainer's ImageNet backbone + GeM."""
    return _embed_untrained(trainer.imagenet_backbone, trainer.config.backbone,
                            trainer.preprocessing, parts, trainer.ctx.device)


def _embed_untrained(backbone: nn.Module, name: str, preprocessing: Preprocessing,
                     parts: Sequence[Sequence[Sample]], device: torch.device,
                     maps: bool = False) -> list:
    """Each part embedded by the ImageNet ``backbone`` (named ``name``) + GeM (``maps``: each
    part a pair, its vectors and its stride-16 descriptors, ``local_descriptors``, or None where
    the backbone gives none). Outside the run's random stream
    (embedding draws DataLoader seeds), so blending or not trains the very same model."""
    from ..models.embed import embed_images

    reference = EmbeddingModel(untrained_config(name, backbone), backbone)
    described = maps and gives_maps(reference)
    with torch.random.fork_rng(devices=[]):
        embedded = [embed_images(reference, [s.path for s in part], preprocessing,
                                 device=device, progress=False, maps=described) for part in parts]
    if maps and not described:  # a backbone with no stage to describe locations by
        return [(vectors, None) for vectors in embedded]
    return embedded


def _fit_whitening(trainer: Trainer, vectors: np.ndarray,
                   samples: Sequence[Sample]) -> tuple[np.ndarray, np.ndarray] | None:
    """With ``whiten_pretrained``: the within-identity whitening fitted on the untrained vectors
    of the validation gallery (the selection's training images, never a validation query), set
    on ``trainer`` for its checkpoints; the refit fits it on the same images, so it ships the
    map selection validated. None (nothing set) when off or nothing can be fitted."""
    if not trainer.config.whiten_pretrained:
        return None
    fitted = fit_within_identity(vectors, [s.identity for s in samples])
    if fitted is not None:
        trainer.reference_whitening = Whitening.from_fit(*fitted).to(trainer.ctx.device)
    return fitted


def _save_best(trainer: Trainer, path: Path, threshold: float | None, metrics: dict,
               pretrained_share: float = 0.0) -> str:
    """The best model of this selection (``best.pt``); returns its fingerprint, which the
    selection remembers."""
    payload = checkpoint_payload(trainer, threshold, "select", metrics,
                                 pretrained_share=pretrained_share)
    save_checkpoint(path, payload)
    return payload["fingerprint"]


def _keep_selected_model(config: TrainConfig, samples: Sequence[Sample], selection: Selection,
                         ctx: distributed.Context, out: Path) -> None:
    """--no-refit: the selected model (``best.pt`` of this run) becomes ``model.pt``, with the
    zero-shot calibration where it ships the ImageNet features alone, as the refit does. A
    best.pt that is missing or is not the one this run wrote (left by an earlier run in the
    same folder) is refused rather than shipped."""
    best = load_checkpoint(out / "best.pt") if (out / "best.pt").is_file() else None
    if best is None or (selection.best_fingerprint is not None
                        and best["fingerprint"] != selection.best_fingerprint):
        raise UserError(f"{out / 'best.pt'} is missing or was not written by this run: train "
                        "again into an empty --out folder")
    if ships_imagenet_features(selection, config):
        backbone = pretrained_backbone(config.backbone).to(ctx.device).eval()
        _, preprocessing = spec_from_dict(best, f"checkpoint {out / 'best.pt'}")
        companion = pretrained_backbone(config.companion).to(ctx.device).eval() \
            if config.companion else None
        selection = _calibrated_on_all_images(config, backbone, preprocessing, samples,
                                              selection, ctx.device, companion)
        if selection.companion_share:
            model, _, _ = model_from_payload(best, out / "best.pt")
            best = _with_companion_payload(model, preprocessing, best, selection.companion_share,
                                           companion, config.companion)
        best = {**best, "threshold": selection.threshold, "hubness": selection.hubness,
                "whiten": selection.whiten}
        best.pop("local", None)  # the carve-out's choice, replaced by the leave-one-out's
        if selection.local:
            best["local"] = selection.local
    save_checkpoint(out / "model.pt", best)


def _run_refit(config: TrainConfig, samples: Sequence[Sample], selection: Selection,
               ctx: distributed.Context, out: Path, epoch_log: EpochLog,
               resume: dict | None) -> None:
    """Retrain on all images exactly as selection trained the model it chose: the same epochs,
    the same frozen / unfrozen epochs and the same learning rate at each epoch (the schedule
    spans ``config.epochs`` and stops at the chosen epoch). If selection chose a frozen-backbone
    epoch, the shipped model has an untouched backbone too, matching its threshold."""
    epochs = max(1, selection.best_epoch)
    if ctx.is_main:
        frozen = min(epochs, config.warmup_epochs)
        log.info("refit: %d epoch(s) (%d with the backbone frozen) on all %d images of %d "
                 "identities", epochs, frozen, len(samples), len(identities_of(samples)))
    trainer = Trainer(config, samples, config.epochs, ctx)
    if resume is not None:
        _restore(trainer, resume)
    while trainer.epoch < epochs:
        started = time.time()
        loss = trainer.train_epoch()
        if ctx.is_main:
            epoch_log.write(stage="refit", trainable_blocks=config.trainable_blocks,
                            epoch=trainer.epoch, train_loss=round(loss, 5),
                            lr_backbone=trainer.scheduler.get_last_lr()[0],
                            seconds=round(time.time() - started, 1))
            log.info("refit epoch %d/%d  loss %.4f  %.0fs", trainer.epoch, epochs, loss,
                     time.time() - started)
            save_checkpoint(out / "last.pt", {**checkpoint_payload(trainer, None, "refit", raw=True),
                                              "trainer": trainer.state(),
                                              "selection": asdict(selection)})
        distributed.barrier(ctx)
    if ctx.is_main:
        if selection.pretrained_share and config.whiten_pretrained:  # the map selection validated
            gallery = validation_split(samples, seed=config.seed,
                                       new_fraction=config.val_new_fraction).gallery
            _fit_whitening(trainer, *_untrained_vectors(trainer, (gallery,)), gallery)
        if ships_imagenet_features(selection, config):
            selection = _calibrated_on_all_images(
                config, trainer.imagenet_backbone, trainer.preprocessing, samples, selection,
                trainer.ctx.device, trainer.companion_backbone if config.companion else None)
        save_checkpoint(out / "model.pt", checkpoint_payload(
            trainer, selection.threshold, "refit",
            {"val_map5": selection.shipped_map5, "val_map5_trained": selection.best_map5,
             "weight_share": selection.weight_share, "hubness": selection.hubness,
             "whiten": selection.whiten, "local": selection.local,
             "companion_share": selection.companion_share},
            pretrained_share=selection.pretrained_share, weight_share=selection.weight_share,
            hubness=selection.hubness, whiten=selection.whiten, local=selection.local,
            companion_share=selection.companion_share))


def _zero_shot_calibration(config: TrainConfig, vectors: np.ndarray, identities: list[str],
                           maps: np.ndarray | None = None):
    """(calibration, whitening, local) of untrained ``vectors`` by leave-one-out, exactly as
    the zero-shot index calibrates its gallery, with the run's hubness and whitening switches;
    with ``maps`` (their local descriptors) the local matching share too, else local None."""
    from index.hubness import WEIGHTS

    from ..gallery_threshold import calibrate_gallery

    return calibrate_gallery(vectors, identities, maps,
                             weights=WEIGHTS if config.hubness else (0.0,),
                             whiten=config.whiten_output)


def choose_training_size(config: TrainConfig, samples: Sequence[Sample],
                         ctx: distributed.Context) -> int | None:
    """The image size for a run without ``--image-size``: the backbone's native size or 5/7 of
    it, whichever the untrained ImageNet features score better by leave-one-out over (up to
    2,000 of) the training images, calibrated as the zero-shot index is
    (``retrieval.image_size``, the index's own choice). Photos and faces prefer the native
    224 px, line drawings 160; trained at the chosen size, test MAP@5 is at or above the
    native size's on average on each shared set (bench/README.md, "Training chooses its image
    size"), and a drawing set trains at half the cost. None (the native size) without
    pretrained weights: random features say nothing about the images' scale. Rank 0 chooses,
    every rank gets it."""
    from ..image_size import choose_image_size
    from ..models.embed import embed_images
    from ..models.model import zero_shot_model

    if not config.pretrained:
        return None

    def choose() -> int:
        model = zero_shot_model(config.backbone)
        native = preprocessing_for(model).image_size

        def embed(size: int, sample: list[Sample]) -> np.ndarray | None:
            try:
                preprocessing = preprocessing_for(model, size)
            except UserError:  # a fixed-size transformer takes its own size only
                return None
            return embed_images(model, [s.path for s in sample], preprocessing,
                                device=ctx.device, progress=False)

        def score(vectors: np.ndarray, identities: list[str]) -> tuple[float, None] | None:
            calibration, _, _ = _zero_shot_calibration(config, vectors, identities)
            return None if calibration is None else (calibration.map5, None)

        return choose_image_size(samples, native, score, embed).size

    return distributed.broadcast(ctx, choose() if ctx.is_main else None)


def ships_imagenet_features(selection: Selection, config: TrainConfig) -> bool:
    """Selection chose a blend of share 1: the shipped embedding is the untrained ImageNet
    features alone (no map fitted on the training images either), training added nothing."""
    return selection.pretrained_share >= 1.0 and not config.whiten_pretrained


def _calibrated_on_all_images(config: TrainConfig, backbone: nn.Module,
                              preprocessing: Preprocessing, samples: Sequence[Sample],
                              selection: Selection, device: torch.device,
                              companion: nn.Module | None = None) -> Selection:
    """Where the model ships the ImageNet features alone (of ``backbone``, at
    ``preprocessing``'s size), its threshold, hubness weight, whitening and (with
    ``local_match``) local matching share are calibrated as the zero-shot index calibrates
    them (``retrieval.gallery_threshold``): by leave-one-out over *all* the training images,
    not on the validation carve-out. The features never learnt these labels, so leave-one-out is
    honest, and it asks several times as many queries in the very gallery an index of the
    training images holds. On the share-1 runs on record (dogs 160 and 224 px, ORL 224 px) the
    zero-shot calibration of the same features tested higher on every one (bench/README.md,
    "Training that adds nothing ships the zero-shot calibration").

    With ``companion`` (the ImageNet backbone of ``config.companion``), the share of its
    untrained features beside them is chosen first, by the same leave-one-out, as
    a zero-shot index chooses it (``_companion_on_all``)."""
    [embedded] = _embed_untrained(backbone, config.backbone, preprocessing, (samples,), device,
                                  maps=config.local_match)
    vectors, maps = embedded if config.local_match else (embedded, None)
    identities = [s.identity for s in samples]
    share = 0.0
    if companion is not None:
        [other] = _embed_untrained(companion, config.companion, preprocessing, (samples,), device)
        vectors, share = _companion_on_all(config, vectors, other, identities)
    calibration, whitening, local = _zero_shot_calibration(config, vectors, identities, maps)
    if calibration is None:  # no identity with two images: keep the carve-out's calibration
        return selection
    log.warning("validation found no gain from training over the ImageNet features, so the model "
                "ships them alone (untrained share 1): new_whale threshold %.4f, hubness weight "
                "%s, whitened %s, local matching share %s, calibrated by leave-one-out over "
                "all %d training images (MAP@5 %.3f), as build_index.py calibrates a zero-shot "
                "index (which, built without --model, also chooses the image size of these "
                "features on its gallery)",
                calibration.threshold, calibration.hubness, whitening is not None,
                "none" if local is None else local.share, len(samples), calibration.map5)
    return replace(selection, threshold=calibration.threshold, hubness=calibration.hubness,
                   whiten=whitening is not None, local=0.0 if local is None else local.share,
                   companion_share=share)


def _companion_on_all(config: TrainConfig, own: np.ndarray, other: np.ndarray,
                      identities: list[str]) -> tuple[np.ndarray, float]:
    """(the vectors, the share) of the companion's untrained features ``other`` beside
    ``own`` at the share whose leave-one-out MAP@5 over these images, calibrated as the
    zero-shot index is, is best (``model.choose_companion_share``)."""
    from ..models.model import choose_companion_share

    def score(vectors: np.ndarray, ids: list[str]) -> tuple[float, None] | None:
        calibration, _, _ = _zero_shot_calibration(config, vectors, ids)
        return None if calibration is None else (calibration.map5, None)

    choice = choose_companion_share(own, other, identities, score)
    if choice is None:
        return own, 0.0
    log.info("companion %s: leave-one-out MAP@5 over the training images %.3f with share %g",
             config.companion, choice.map5[choice.share], choice.share)
    return choice.vectors, choice.share


def _restore(trainer: Trainer, resume: dict) -> None:
    """Weights and optimiser / schedule / loss state of a resumed run; a ``last.pt`` that does
    not fit this run (edited, or of another configuration) is one line, not a traceback."""
    try:
        trainer.model.load_state_dict(resume["state_dict"])
        trainer.load_state(resume["trainer"])
    except (KeyError, ValueError, RuntimeError, TypeError) as err:
        raise UserError(f"cannot resume from this checkpoint: its training state does not fit "
                        f"this run ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
                        "pass the last.pt of the interrupted run, or start afresh") from None


def check_resumable(state: dict, path: str | Path) -> None:
    """A checkpoint to resume from is a ``last.pt``: it has a stage, the trainer's state and
    the selection so far (model.pt and best.pt do not)."""
    if state.get("stage") not in ("select", "refit") or not isinstance(state.get("trainer"), dict) \
            or not isinstance(state.get("selection"), dict) \
            or not isinstance(state.get("train_config"), dict):
        raise UserError(f"{path} cannot be resumed: it is not the last.pt of a run (model.pt and "
                        "best.pt hold no training state); pass the run's last.pt")
    try:
        Selection(**state["selection"])
        TrainConfig.from_dict(state["train_config"])
    except TypeError as err:
        raise UserError(f"{path} cannot be resumed: its saved run is damaged ({err})") from None


def seed_everything(seed: int) -> None:
    """Seed every random source a run draws from: torch (weights, shuffling, DataLoader worker
    seeds), NumPy (pml's MPerClassSampler uses the global NumPy state) and Python's ``random``;
    the augmentation pipeline gets its own seed in ``Trainer._loader``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(config: TrainConfig, samples: Sequence[Sample], resume: str | Path | None = None) -> Path:
    """Train on ``samples`` (never the test queries); returns the path of ``model.pt``."""
    require_identities(samples, 2)
    if config.flip and "mirror" in config.new_identities:
        raise UserError("--flip says a mirror image shows the same identity, --new-identities "
                        f"{config.new_identities} that it shows another one: drop one of them")
    ctx = distributed.setup(config.device)
    state = load_checkpoint(resume) if resume else None
    if state is not None:
        check_resumable(state, resume)
    elif config.image_size is None:  # before seeding: --image-size N trains the same run
        config = replace(config, image_size=choose_training_size(config, samples, ctx))
    seed_everything(config.seed)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    epoch_log = EpochLog(out / "log.csv", ctx.is_main, append=state is not None)
    if state is not None:
        # a run saved before the companion existed had none
        config = TrainConfig.from_dict({"companion": "", **state["train_config"],
                                        "out": config.out, "num_workers": config.num_workers,
                                        "device": config.device})
        if ctx.is_main:
            log.info("resuming %s at stage %s, epoch %d", resume, state["stage"], state["epoch"])
    if ctx.is_main:
        write_config(config, out)
    if state is None or state["stage"] == "select":
        config, selection = _run_selections(config, samples, ctx, out, epoch_log, state)
        state = None
    else:
        selection = Selection(**state["selection"])
    if ctx.is_main:
        log.info("selected epoch %d: validation MAP@5 %.4f trained alone, %.4f as shipped (share "
                 "of the untrained features %s, of the ImageNet weights %s, hubness correction "
                 "%s, whitened %s, companion share %s), new_whale threshold %s",
                 selection.best_epoch, selection.best_map5, selection.shipped_map5,
                 selection.pretrained_share, selection.weight_share, selection.hubness,
                 selection.whiten, selection.companion_share, selection.threshold)
    if config.refit:
        _run_refit(config, samples, selection, ctx, out, epoch_log, state)
    elif ctx.is_main:
        _keep_selected_model(config, samples, selection, ctx, out)
    distributed.barrier(ctx)
    return out / "model.pt"
