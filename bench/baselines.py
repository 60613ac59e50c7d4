"""The softmax classifier the seed whale projects used, trained on the same images as the engine.

It reuses the engine's model factory, preprocessing, augmentation, training recipe
(``retrieval.training.recipe``) and image decoding, so the only difference measured is the method
(classifier vs metric learning).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from retrieval.data import Sample, identities_of
from retrieval.models.embed import ImageDataset, default_device
from retrieval.metrics import map_at_k
from retrieval.models.model import EmbeddingModel, ModelConfig, Preprocessing, create_model, preprocessing_for
from retrieval.training import recipe
from retrieval.training.recipe import Recipe
from retrieval.config import TrainConfig
from retrieval.training.train import seed_everything
from retrieval.models.transforms import eval_transform, seed_worker_transform, train_transform

from .common import whole_backbone


@dataclass
class SoftmaxClassifier:
    """A trained classifier: ``model`` (backbone + GeM, no neck) feeds ``head`` (Linear over
    ``classes``); ``model`` alone is also an embedding model (L2-normalised GeM features)."""
    model: EmbeddingModel
    head: nn.Linear
    classes: list[str]
    preprocessing: Preprocessing
    train_seconds: float
    epochs: int
    final_loss: float


def train_softmax_classifier(config: TrainConfig, gallery: Sequence[Sample]) -> SoftmaxClassifier:
    """Backbone + GeM + Linear over the gallery identities, cross-entropy, ``config.epochs``
    epochs with the engine's optimiser settings (AdamW, per-group learning rates, frozen-backbone
    warm-up, cosine decay), as the seed whale projects trained their classifiers.
    """
    seed_everything(config.seed)
    device = default_device() if config.device is None else torch.device(config.device)
    model = create_model(ModelConfig(config.backbone, embedding_dim=0), pretrained=config.pretrained)
    preprocessing = preprocessing_for(model, config.image_size)
    classes = identities_of(gallery)
    index_of = {name: i for i, name in enumerate(classes)}
    classifier = nn.Linear(model.embedding_dim, len(classes))
    model.to(device)
    classifier.to(device)
    dataset = ImageDataset([s.path for s in gallery],
                           train_transform(preprocessing, config.flip, seed=config.seed,
                                           strength=config.augment),
                           [index_of[s.identity] for s in gallery])
    batch = max(2, min(config.batch_size, len(gallery)))
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, generator=generator,
                        num_workers=config.num_workers, persistent_workers=config.num_workers > 0,
                        worker_init_fn=seed_worker_transform)
    plan = Recipe.from_config(whole_backbone(config))
    optimizer = recipe.create_optimizer(
        recipe.param_groups(model, plan, extra_head=classifier.parameters()).values(), plan)
    scheduler = recipe.create_scheduler(optimizer, len(loader), config.epochs, plan)
    criterion = nn.CrossEntropyLoss()
    started = time.perf_counter()
    loss_value = float("nan")
    for epoch in range(config.epochs):
        frozen = recipe.backbone_frozen(epoch, plan)
        model.train()
        classifier.train()
        recipe.set_backbone_frozen(model, frozen, plan.freeze_bn, recipe.released_blocks(epoch, plan))
        losses = []
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            with torch.set_grad_enabled(not frozen):
                features = model.forward_features(images)
            logits = classifier(model.pool(features))
            loss = criterion(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
        loss_value = float(np.mean(losses)) if losses else float("nan")
    model.eval()
    classifier.eval()
    return SoftmaxClassifier(model, classifier, classes, preprocessing,
                             time.perf_counter() - started, config.epochs, loss_value)


@torch.no_grad()
def top5_classes_map(trained: SoftmaxClassifier, queries: Sequence[Sample]) -> float:
    """MAP@5 when the answer is the top-5 classes; ``new_whale`` is never answered (what a plain
    classifier does), so every new query scores 0."""
    answers = []
    loader = DataLoader(ImageDataset([q.path for q in queries], eval_transform(trained.preprocessing)),
                        batch_size=64)
    device = next(trained.head.parameters()).device
    for images in loader:
        images = images.to(device)
        logits = trained.head(trained.model.pool(trained.model.forward_features(images)))
        top = logits.topk(min(5, len(trained.classes)), dim=1).indices
        answers.extend([[trained.classes[i] for i in row] for row in top.tolist()])
    return map_at_k(answers, [q.identity for q in queries])
