"""Probe: local matching with a share-0 trained model's OWN stride-16 maps (kept runs)."""
import sys, json, torch
from dataclasses import replace
from retrieval.data import read_folder_gallery as load_samples, validation_split, whale_split
from retrieval.models.checkpoint import load_model
from retrieval.training.evaluate import evaluate_local, rank_queries
from retrieval.training.evaluate import score
from index.hubness import WEIGHTS
torch.set_num_threads(1)
data, kept, mode, seeds = sys.argv[1], sys.argv[2], sys.argv[3], [int(s) for s in sys.argv[4:]]
def own(model):
    orig = model.forward_with_maps
    def fwm(images):
        maps = model.forward_features(images)
        return orig(images)[0], maps
    model.forward_with_maps = fwm
    return model

samples = load_samples(data)
for seed in seeds:
    split = whale_split(samples, seed)
    run = f"{kept}/seed{seed}"
    model, pre, best = load_model(f"{run}/best.pt")
    if mode == "own": own(model)
    print(seed, "share", model.config.pretrained_share, "ref", model.reference is not None,
          "val", best["metrics"].get("val_map5"), "hub", best.get("hubness"), "whiten", best.get("whiten"), flush=True)
    vsplit = validation_split(split.gallery, seed=seed, new_fraction=0.2)
    res = evaluate_local(model, pre, vsplit.gallery, vsplit.queries, WEIGHTS,
                         fitted_on=split.gallery if best.get("whiten") else None, seed=seed, progress=False)
    for share, w, r in res:
        print(f"  val share {share} w {w}: {r.map5:.4f}", flush=True)
    m, pre2, payload = load_model(f"{run}/model.pt")
    if mode == "own": own(m)
    bestv = max(res, key=lambda t: t[2].map5)
    print("  chosen", bestv[0], bestv[1], round(bestv[2].map5,4), "vs", best["metrics"].get("val_map5"), flush=True)
    res = [bestv]
    truths = [q.identity for q in split.queries]
    for share, w, thr in [(0.0, payload["hubness"], payload["threshold"])] + [(s, w_, r.threshold) for s, w_, r in res]:
        ranking = rank_queries(m, pre2, split.gallery, split.queries, hubness=w, whiten=payload.get("whiten", False), local=share, progress=False)
        print(f"  test share {share} w {w}: {score(ranking, truths, thr):.4f}", flush=True)
