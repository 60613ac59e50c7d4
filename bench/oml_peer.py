"""The open-metric-learning peer (run by bench/peers.py inside bench/.venv-peers, never directly
in the project's venv): OML's triplet loss with its all-triplets miner and its balance sampler,
trained in a plain loop as OML's README does, on the engine's model, images and augmentation;
scored with pml's AccuracyCalculator like every other row, plus OML's own CMC@1 as a cross-check.

  bench/.venv-peers/bin/python -m bench.oml_peer --data orl --image-size 96 --budget-s 60 --json-out x.json
"""
from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="orl")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-s", type=float, required=True)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json-out", required=True)
    args = p.parse_args()
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(args.threads)

    import numpy as np
    import torch
    from importlib import metadata

    torch.set_num_threads(args.threads)
    from oml.functional.metrics import calc_retrieval_metrics
    from oml.losses import TripletLossWithMiner
    from oml.miners import AllTripletsMiner
    from oml.samplers import BalanceSampler
    from torch.utils.data import DataLoader

    from retrieval.data import open_set_split, read_folder_gallery
    from retrieval.embed import ImageDataset, embed_images
    from retrieval.model import ModelConfig, create_model, preprocessing_for
    from retrieval.train import TrainConfig
    from retrieval.transforms import train_transform

    from .common import data_path
    from .open_set import label_array, open_set_metrics

    config = TrainConfig(seed=args.seed)
    train_samples, test = open_set_split(read_folder_gallery(data_path(args.data)))
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    model = create_model(ModelConfig(config.backbone, config.embedding_dim), pretrained=True)
    pre = preprocessing_for(model, args.image_size)
    labels = label_array(train_samples)
    dataset = ImageDataset([s.path for s in train_samples], train_transform(pre), labels.tolist())
    n_instances = 2
    sampler = BalanceSampler(labels.tolist(), n_labels=config.batch_size // n_instances,
                             n_instances=n_instances)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers)
    criterion = TripletLossWithMiner(margin=0.1, miner=AllTripletsMiner(), need_logs=False)
    optimizer = torch.optim.AdamW([
        {"params": model.backbone.parameters(), "lr": config.lr},
        {"params": list(model.pool.parameters()) + list(model.neck.parameters()), "lr": config.head_lr},
    ], weight_decay=config.weight_decay)
    started = time.perf_counter()
    epoch_ends: list[float] = []
    while True:
        model.train()
        for images, batch_labels in loader:
            loss = criterion(model(images), batch_labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        epoch_ends.append(time.perf_counter() - started)
        last = epoch_ends[-1] - (epoch_ends[-2] if len(epoch_ends) > 1 else 0.0)
        if epoch_ends[-1] + last > args.budget_s:
            break
    seconds = time.perf_counter() - started
    vectors = embed_images(model, [s.path for s in test], pre, progress=False)
    test_labels = label_array(test)
    metrics = open_set_metrics(vectors, test_labels)
    # OML's own CMC@1 on the same vectors: every other test image is a gallery item
    sims = torch.from_numpy(vectors @ vectors.T)
    sims.fill_diagonal_(-float("inf"))
    retrieved = [row for row in sims.topk(1, dim=1).indices]
    same = torch.from_numpy(test_labels[:, None] == test_labels[None, :])
    same.fill_diagonal_(False)
    gt = [torch.nonzero(row).flatten() for row in same]
    oml_metrics = calc_retrieval_metrics(retrieved, gt, cmc_top_k=(1,), precision_top_k=(),
                                         map_top_k=(), verbose=False)
    result = {**metrics, "train_seconds": round(seconds, 1), "epochs": len(epoch_ends),
              "images_seen": len(epoch_ends) * len(sampler) * config.batch_size,
              "oml_cmc_at_1": float(oml_metrics["cmc"][1]),
              "oml_version": metadata.version("open-metric-learning"),
              "scored_by": "AccuracyCalculator on embed_images vectors (+ OML calc_retrieval_metrics cmc@1)"}
    with open(args.json_out, "w") as handle:
        json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
