"""The open-metric-learning peer, run by ``bench.peers.train_oml`` inside bench/.venv-peers (never
in the project's venv): OML's triplet loss with its all-triplets miner and its balance sampler,
trained in a plain loop as OML's README does, on the engine's model, images and augmentation.

  bench/.venv-peers/bin/python -m bench.oml_peer SPEC.json OUT_DIR

SPEC.json: {"train": [[path, identity], ...], "eval": [path, ...], "eval_labels": [...] | null,
"image_size", "seed", "budget_s", "workers", "threads", "device"}. Writes OUT_DIR/vectors.npy (embeddings of
"eval", scored by the calling suite like every other row) and OUT_DIR/stats.json; with
"eval_labels", also OML's own CMC@1 of every eval image against the others, a cross-check of the
suite's Recall@1.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from pathlib import Path


def main(spec_path: str, out_dir: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(spec["threads"])

    from importlib import metadata

    import numpy as np
    import torch

    torch.set_num_threads(spec["threads"])
    from oml.functional.metrics import calc_retrieval_metrics
    from oml.losses import TripletLossWithMiner
    from oml.miners import AllTripletsMiner
    from oml.samplers import BalanceSampler
    from torch.utils.data import DataLoader

    from retrieval.models.embed import ImageDataset, embed_images
    from retrieval.training import recipe
    from retrieval.config import TrainConfig
    from retrieval.models.model import ModelConfig, create_model, preprocessing_for
    from retrieval.training.train import seed_everything
    from retrieval.models.transforms import train_transform

    from .common import label_array
    from .peers import peer_recipe

    config = TrainConfig(seed=spec["seed"])
    seed_everything(spec["seed"])  # BalanceSampler draws from the global NumPy state
    counts = Counter(identity for _, identity in spec["train"])
    train = [(path, identity) for path, identity in spec["train"] if counts[identity] >= 2]
    device = torch.device(spec.get("device", "cpu"))
    model = create_model(ModelConfig(config.backbone, config.embedding_dim), pretrained=True).to(device)
    pre = preprocessing_for(model, spec["image_size"])
    labels = label_array([identity for _, identity in train])
    dataset = ImageDataset([path for path, _ in train], train_transform(pre, seed=spec["seed"]),
                           labels.tolist())
    n_instances = 2
    sampler = BalanceSampler(labels.tolist(), n_labels=config.batch_size // n_instances,
                             n_instances=n_instances)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=spec["workers"])
    criterion = TripletLossWithMiner(margin=config.triplet_margin, miner=AllTripletsMiner(),
                                     need_logs=False)
    plan = peer_recipe(config)
    optimizer = recipe.create_optimizer(recipe.param_groups(model, plan).values(), plan)
    started = time.perf_counter()
    epoch_ends: list[float] = []
    while True:
        model.train()
        for images, batch_labels in loader:
            loss = criterion(model(images.to(device)), batch_labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        epoch_ends.append(time.perf_counter() - started)
        last = epoch_ends[-1] - (epoch_ends[-2] if len(epoch_ends) > 1 else 0.0)
        if epoch_ends[-1] + last > spec["budget_s"]:
            break
    seconds = time.perf_counter() - started
    vectors = embed_images(model, spec["eval"], pre, progress=False, device=device)
    stats = {"train_seconds": round(seconds, 1), "epochs": len(epoch_ends),
             "images_seen": len(epoch_ends) * len(sampler) * config.batch_size,
             "train_images": len(train), "train_images_dropped_singletons": len(spec["train"]) - len(train),
             "oml_version": metadata.version("open-metric-learning")}
    if spec.get("eval_labels"):
        eval_labels = label_array(spec["eval_labels"])
        sims = torch.from_numpy(vectors @ vectors.T)
        sims.fill_diagonal_(-float("inf"))
        retrieved = list(sims.topk(1, dim=1).indices)
        same = torch.from_numpy(eval_labels[:, None] == eval_labels[None, :])
        same.fill_diagonal_(False)
        gt = [torch.nonzero(row).flatten() for row in same]
        oml = calc_retrieval_metrics(retrieved, gt, cmc_top_k=(1,), precision_top_k=(),
                                     map_top_k=(), verbose=False)
        stats["oml_cmc_at_1"] = float(oml["cmc"][1])
    np.save(Path(out_dir) / "vectors.npy", vectors)
    (Path(out_dir) / "stats.json").write_text(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:3])
