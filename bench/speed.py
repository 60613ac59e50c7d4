"""Speed, as ratios measured within one run (robust to a loaded machine; absolutes are not).

  python -m bench speed                       # all parts, CPU, one thread
  python -m bench speed --parts embed train   # a subset
  python -m bench speed --index-sizes 10000 100000 1000000 --index-types flat ivf

Parts:
  embed   gallery path (decode + preprocess + forward, ``retrieval.models.embed.embed_images``) images/s
          ÷ the same model's bare forward on random tensors of the same shape and batch
  search  ``index.GalleryIndex.search`` (k=5 identities, neighbour folding) ÷ bare FAISS
          IndexFlatIP search on the same vectors (k=5, and k = the neighbours GalleryIndex asks for)
  knn     exact top-5: FAISS flat vs numpy matmul + argpartition vs scikit-learn NearestNeighbors
          (brute), same vectors, with agreement of their top-5 sets
  train   images/s of ``retrieval.training.train.Trainer.train_epoch`` ÷ a minimal hand-written PyTorch
          loop with the same model, loss (ArcFace), batch size, images and augmentation
  query   ``query.py`` on one image, as a fresh process: cold (first run) and warm (median of the
          next runs, files in the page cache)
  serve   serve.py over HTTP: one client's p50/p95 by gallery size beside the bare in-process work,
          8 concurrent clients with and without dynamic batching, and cold query.py's wall time
          and peak RSS (bench/serve_speed.py)
  index   HNSW / IVF recall@5 and queries/s by gallery size: runs bench/index_speed.py
  scale   --scale-size vectors (default 1M x 512, float32, generated in chunks: ~2 GB): flat
          through GalleryIndex vs bare FAISS, and GalleryIndex's own --scale-types (ivf, hnsw)
          with the parameters it picks for that size. --scale-gallery realistic draws the vectors
          from a model fitted to real zero-shot embeddings of --scale-fit-data (projected to
          --dim) instead of isotropic identities (index.synthetic.fit_gallery_model)
  milvus  the Milvus backend (milvus-lite) beside FAISS on the scale part's galleries: write /
          build time, batched q/s, 1-query ms, recall@5 and top-5 overlap with exact search, for
          flat / ivf / hnsw (bench/milvus_speed.py; needs pymilvus + milvus-lite)
  write   save_index on a memory-mapped gallery of --write-sizes: seconds, peak anonymous memory
          against the raw vectors' size, and the written index's recall (bench/write_speed.py)
Repetitions are interleaved (A B A B ...) and the best of each is kept, so a burst of load from
other jobs hits both sides of a ratio alike.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import ROOT, Report, data_path, format_table, torch_device

PARTS = ("embed", "search", "knn", "train", "query", "serve", "index", "scale", "milvus", "write")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--data", default="omniglot", help="images for embed / train / query")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--embed-images", type=int, default=256, help="images embedded per repetition")
    p.add_argument("--embed-batch", type=int, default=64)
    p.add_argument("--train-images", type=int, default=160, help="images per timed training epoch")
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (embed, train)")
    p.add_argument("--repeats", type=int, default=2, help="timed repetitions of each side")
    p.add_argument("--gallery", type=int, nargs="+", default=[10_000, 100_000],
                   help="synthetic gallery sizes (vectors) for search / knn")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--query-runs", type=int, default=4, help="query.py runs (first = cold)")
    p.add_argument("--serve-gallery", type=int, nargs="+", default=[1_000, 100_000],
                   help="gallery sizes for the serve part (a real ORL index topped up with "
                        "synthetic vectors)")
    p.add_argument("--serve-requests", type=int, default=100, help="single-client requests per size")
    p.add_argument("--serve-clients", type=int, default=8, help="concurrent clients (serve part)")
    p.add_argument("--serve-seconds", type=float, default=30, help="length of the concurrent run")
    p.add_argument("--index-sizes", type=int, nargs="+", default=[10_000],
                   help="gallery sizes for bench/index_speed.py (1000000 takes long: see README)")
    p.add_argument("--index-types", nargs="+", default=["flat", "hnsw", "ivf"])
    p.add_argument("--scale-size", type=int, default=1_000_000, help="vectors for the scale part")
    p.add_argument("--scale-types", nargs="*", default=["ivf", "hnsw"], choices=["ivf", "hnsw", "ivfpq"],
                   help="approximate GalleryIndex types measured at the scale size (default ivf hnsw; "
                        "HNSW builds slowly: ~15-30 min for 1M on one core)")
    p.add_argument("--scale-gallery", choices=["isotropic", "realistic"], default="isotropic",
                   help="isotropic identities (the hard case) or identities drawn from a model "
                        "of real embeddings (default %(default)s)")
    p.add_argument("--scale-fit-data", default="dogfacenet",
                   help="the shared set whose zero-shot embeddings the realistic gallery follows")
    p.add_argument("--scale-nprobe", type=int, nargs="*", default=[],
                   help="also search the scale part's IVF with these nprobe values (no rebuild)")
    p.add_argument("--milvus-sizes", type=int, nargs="+", default=[10_000, 100_000],
                   help="gallery sizes for the milvus part (1000000: about an hour of upserts here)")
    p.add_argument("--milvus-types", nargs="+", default=["flat", "ivf", "hnsw"],
                   choices=["flat", "ivf", "hnsw"], help="index types for the milvus part")
    p.add_argument("--milvus-faiss-types", nargs="*", default=None, choices=["flat", "ivf", "hnsw"],
                   help="FAISS types measured beside Milvus on the same gallery (default: the "
                        "--milvus-types; give none to skip FAISS, e.g. where the scale part has them)")
    p.add_argument("--milvus-queries", type=int, default=1000, help="queries for the milvus part")
    p.add_argument("--write-sizes", type=int, nargs="+", default=[100_000],
                   help="gallery sizes for the write part (memory-mapped, on disk in /tmp)")
    p.add_argument("--write-types", nargs="+", default=["flat", "ivfpq"],
                   choices=["flat", "ivf", "hnsw", "ivfpq", "auto"],
                   help="index types for the write part (auto: what build_index.py picks)")
    p.add_argument("--write-gallery", choices=["isotropic", "realistic"], default="isotropic",
                   help="the write part's vectors: isotropic, or drawn like --scale-gallery realistic")
    p.add_argument("--write-dir", default=None,
                   help="folder for the write part's gallery and index (default the temp folder; "
                        "10M x 512 needs ~42 GB free: the gallery and the index's own copy)")
    p.add_argument("--write-queries", type=int, default=1000, help="queries for the write part")
    p.add_argument("--scale-queries", type=int, default=1000,
                   help="batched queries for the scale part (FAISS flat is ~7x slower per query "
                        "in batches of 200 than of 1000 here: keep batches large)")


def _best_interleaved(fns: dict, repeats: int, warmup: bool = True) -> dict[str, list[float]]:
    """Seconds of each callable, run in turn ``repeats`` times (after one untimed round)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    if warmup:
        for fn in fns.values():
            fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return times


# ----------------------------------------------------------------------------- embed

def bench_embed(args) -> dict:
    import torch

    from retrieval.data import read_folder_gallery
    from retrieval.models.embed import ImageDataset, embed_images
    from retrieval.models.model import ModelConfig, create_model, preprocessing_for
    from retrieval.models.transforms import eval_transform
    from torch.utils.data import DataLoader

    samples = read_folder_gallery(data_path(args.data))
    step = max(1, len(samples) // args.embed_images)
    paths = [s.path for s in samples[::step][:args.embed_images]]
    device = torch_device(getattr(args, "device", None))
    model = create_model(ModelConfig(embedding_dim=512), pretrained=True).eval().to(device)
    pre = preprocessing_for(model, args.image_size)
    batches = [min(args.embed_batch, len(paths) - i) for i in range(0, len(paths), args.embed_batch)]
    randoms = [torch.randn(b, 3, pre.image_size, pre.image_size, device=device)
               for b in sorted(set(batches))]
    by_size = {r.shape[0]: r for r in randoms}

    def gallery_path():
        embed_images(model, paths, pre, batch_size=args.embed_batch, num_workers=args.workers,
                     device=device, progress=False)

    @torch.no_grad()
    def bare_forward():
        for b in batches:
            model(by_size[b])
        synchronize(device)

    def decode_only():
        loader = DataLoader(ImageDataset(paths, eval_transform(pre)), batch_size=args.embed_batch,
                            num_workers=args.workers)
        for _ in loader:
            pass

    times = _best_interleaved({"embed_images": gallery_path, "bare_forward": bare_forward,
                               "decode_preprocess_only": decode_only}, args.repeats)
    rate = {k: len(paths) / min(v) for k, v in times.items()}
    return {"images": len(paths), "batch": args.embed_batch, "image_size": pre.image_size,
            "workers": args.workers, "device": str(device), "seconds": times,
            "images_per_s": {k: round(v, 1) for k, v in rate.items()},
            "ratio_embed_over_bare": round(rate["embed_images"] / rate["bare_forward"], 3)}


def synchronize(device) -> None:
    """Wait for queued GPU work, so a timed function's time includes it (no-op on the CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- search / knn

def _synthetic(n_vectors: int, dim: int, n_queries: int, seed: int = 0):
    sys.path.insert(0, str(ROOT))
    from index.synthetic import clustered_vectors

    gallery, labels, queries, truth = clustered_vectors(max(1, n_vectors * 2 // 5), dim, seed,
                                                        spread=0.25)
    rng = np.random.default_rng(seed + 1)
    pick = rng.choice(len(queries), size=min(n_queries, len(queries)), replace=False)
    return gallery, labels, queries[pick], truth[pick]


def bench_search(args, n: int) -> dict:
    import faiss

    from index import GalleryIndex

    gallery, labels, queries, _ = _synthetic(n, args.dim, args.queries)
    engine = GalleryIndex(gallery, labels)
    bare = faiss.IndexFlatIP(args.dim)
    bare.add(gallery)
    wide = min(len(engine), 5 * engine.max_images_per_identity)
    fns = {"GalleryIndex.search(k=5)": lambda: engine.search(queries, 5),
           "faiss flat search(k=5)": lambda: bare.search(queries, 5),
           f"faiss flat search(k={wide})": lambda: bare.search(queries, wide)}
    times = _best_interleaved(fns, args.repeats)
    single = queries[:100]
    one = {"GalleryIndex.search(k=5)": lambda: [engine.search(q[None], 5) for q in single],
           "faiss flat search(k=5)": lambda: [bare.search(q[None], 5) for q in single]}
    single_times = _best_interleaved(one, args.repeats, warmup=False)
    qps = {k: len(queries) / min(v) for k, v in times.items()}
    ms = {k: 1000 * min(v) / len(single) for k, v in single_times.items()}
    return {"gallery": len(gallery), "dim": args.dim, "queries": len(queries),
            "neighbours_asked_by_engine": wide, "batch_queries_per_s": {k: round(v, 1) for k, v in qps.items()},
            "single_query_ms": {k: round(v, 3) for k, v in ms.items()},
            "ratio_engine_over_bare_k5": round(qps["GalleryIndex.search(k=5)"] / qps["faiss flat search(k=5)"], 3),
            "ratio_engine_over_bare_same_k": round(qps["GalleryIndex.search(k=5)"] / qps[f"faiss flat search(k={wide})"], 3),
            "ratio_single_query_engine_over_bare": round(ms["faiss flat search(k=5)"] / ms["GalleryIndex.search(k=5)"], 3)}


def bench_knn(args, n: int) -> dict:
    import faiss
    from sklearn.neighbors import NearestNeighbors

    gallery, _, queries, _ = _synthetic(n, args.dim, args.queries)
    k = 5
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(gallery)
    knn = NearestNeighbors(n_neighbors=k, algorithm="brute", metric="cosine").fit(gallery)

    def numpy_topk():
        sims = queries @ gallery.T
        part = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1)
        return np.take_along_axis(part, order, axis=1)

    results = {}
    fns = {"faiss IndexFlatIP": lambda: results.__setitem__("faiss", flat.search(queries, k)[1]),
           "numpy matmul + argpartition": lambda: results.__setitem__("numpy", numpy_topk()),
           "sklearn NearestNeighbors(brute, cosine)":
               lambda: results.__setitem__("sklearn", knn.kneighbors(queries, return_distance=False))}
    times = _best_interleaved(fns, args.repeats)
    qps = {name: len(queries) / min(t) for name, t in times.items()}
    base = qps["faiss IndexFlatIP"]
    agree = {name: round(float(np.mean([len(set(a) & set(b)) / k for a, b in
                                        zip(results[name], results["faiss"])])), 4)
             for name in ("numpy", "sklearn")}
    return {"gallery": len(gallery), "dim": args.dim, "queries": len(queries), "k": k,
            "queries_per_s": {name: round(v, 1) for name, v in qps.items()},
            "ratio_over_faiss": {name: round(v / base, 3) for name, v in qps.items()},
            "top5_agreement_with_faiss": agree}


# ----------------------------------------------------------------------------- train

def bench_train(args) -> dict:
    import torch
    from pytorch_metric_learning import losses
    from torch.utils.data import DataLoader

    from retrieval import distributed
    from retrieval.data import identities_of, read_folder_gallery
    from retrieval.models.embed import ImageDataset
    from retrieval.models.model import ModelConfig, create_model, preprocessing_for
    from retrieval.config import TrainConfig
    from retrieval.training.train import Trainer
    from retrieval.models.transforms import train_transform

    samples = read_folder_gallery(data_path(args.data))
    groups: dict[str, list] = {}
    for s in samples:
        groups.setdefault(s.identity, []).append(s)
    per_identity = 8
    chosen = [s for group in list(groups.values())[: max(2, args.train_images // per_identity)]
              for s in group[:per_identity]][: args.train_images]
    config = TrainConfig(out=tempfile.mkdtemp(prefix="bench-speed-"), image_size=args.image_size,
                         loss="arcface", epochs=1000, warmup_epochs=0, batch_size=args.train_batch,
                         num_workers=args.workers, device=getattr(args, "device", None), seed=0,
                         trainable_blocks=0)  # one depth: the step being timed trains it all
    torch.manual_seed(0)
    ctx = distributed.setup(config.device)
    device = ctx.device
    trainer = Trainer(config, chosen, config.epochs, ctx)

    # the minimal loop: same architecture and weights, same loss and optimiser, same data
    model = create_model(ModelConfig(config.backbone, config.embedding_dim), pretrained=True).to(device)
    pre = preprocessing_for(model, config.image_size)
    classes = identities_of(chosen)
    index_of = {c: i for i, c in enumerate(classes)}
    loss_fn = losses.ArcFaceLoss(len(classes), model.embedding_dim, margin=28.6, scale=30).to(device)
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(loss_fn.parameters()), lr=1e-3,
                                  weight_decay=1e-4)
    loader = DataLoader(ImageDataset([s.path for s in chosen], train_transform(pre),
                                     [index_of[s.identity] for s in chosen]),
                        batch_size=config.batch_size, shuffle=True, drop_last=True,
                        num_workers=args.workers, persistent_workers=args.workers > 0)
    counted = {"bare": 0}

    def bare_epoch():
        model.train()
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            loss = loss_fn(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            counted["bare"] += len(labels)
        synchronize(device)

    def trainer_epoch():
        trainer.train_epoch()
        synchronize(device)

    images_per_epoch = len(trainer.loader) * trainer.loader.batch_size
    times = _best_interleaved({"Trainer.train_epoch": trainer_epoch, "minimal loop": bare_epoch},
                              args.repeats)
    bare_images = len(loader) * config.batch_size
    rate = {"Trainer.train_epoch": images_per_epoch / min(times["Trainer.train_epoch"]),
            "minimal loop": bare_images / min(times["minimal loop"])}
    import shutil
    shutil.rmtree(config.out, ignore_errors=True)
    return {"images": len(chosen), "identities": len(classes), "batch": config.batch_size,
            "image_size": pre.image_size, "workers": args.workers, "loss": "arcface",
            "device": str(device),
            "backbone_frozen": False, "seconds": times,
            "images_per_s": {k: round(v, 2) for k, v in rate.items()},
            "ratio_trainer_over_minimal": round(rate["Trainer.train_epoch"] / rate["minimal loop"], 3)}


# ----------------------------------------------------------------------------- query.py

def bench_query(args) -> dict:
    script = ROOT / "query.py"
    if not script.is_file() or not (ROOT / "build_index.py").is_file():
        return {"skipped": "query.py or build_index.py is absent"}
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONUNBUFFERED": "1"}
    gallery = data_path("orl")
    image = sorted(p for p in (gallery / "s1").iterdir() if p.suffix.lower() == ".pgm")[0]
    with tempfile.TemporaryDirectory(prefix="bench-query-") as temp:
        index_dir = Path(temp) / "index"
        started = time.perf_counter()
        build = subprocess.run([sys.executable, "build_index.py", "--gallery", str(gallery),
                                "--image-size", str(args.image_size), "--out", str(index_dir)],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        build_s = time.perf_counter() - started
        if build.returncode != 0:
            return {"skipped": f"build_index.py failed (exit {build.returncode}): "
                               f"{build.stderr.strip().splitlines()[-1:] }"}
        runs = []
        for _ in range(args.query_runs):
            started = time.perf_counter()
            result = subprocess.run([sys.executable, "query.py", str(image), "--index", str(index_dir)],
                                    cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
            runs.append(time.perf_counter() - started)
            if result.returncode != 0:
                return {"skipped": f"query.py failed (exit {result.returncode}): "
                                   f"{result.stderr.strip().splitlines()[-1:]}"}
        imports = subprocess.run([sys.executable, "-c", "import time; t=time.perf_counter(); "
                                  "import torch, timm, faiss, albumentations; "
                                  "print(time.perf_counter()-t)"], cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=300)
    return {"gallery": "orl_faces (400 images, zero-shot model)", "image_size": args.image_size,
            "query_image": str(image.relative_to(gallery.parent)), "build_index_s": round(build_s, 2),
            "runs_s": [round(r, 3) for r in runs], "cold_s": round(runs[0], 3),
            "warm_s": round(statistics.median(runs[1:]), 3) if len(runs) > 1 else None,
            "import_torch_timm_faiss_albumentations_s":
                round(float(imports.stdout.strip() or "nan"), 3),
            "first_line": result.stdout.strip().splitlines()[:2]}


# ----------------------------------------------------------------------------- index types

def bench_index(args) -> list[dict]:
    script = ROOT / "bench" / "index_speed.py"
    if not script.is_file():
        return [{"skipped": "bench/index_speed.py is absent"}]
    out = Path(args.out) if getattr(args, "out", None) else ROOT / "bench" / "results"
    rows = []
    for n in args.index_sizes:
        command = [sys.executable, str(script), "--n", str(n), "--types", *args.index_types,
                   "--out", str(out)]
        started = time.perf_counter()
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        seconds = time.perf_counter() - started
        print(result.stdout, end="", flush=True)
        if result.returncode != 0:
            rows.append({"n": n, "failed": result.stderr.strip().splitlines()[-1:]})
            continue
        written = [line for line in result.stdout.splitlines() if line.startswith("(written to ")]
        path = Path(written[-1][len("(written to "):-1]) if written else None
        report = json.loads(path.read_text()) if path and path.is_file() else {}
        rows.append({"n": n, "json": str(path), "seconds": round(seconds, 1),
                     "gallery": report.get("gallery"), "results": report.get("results", [])})
    return rows


# ----------------------------------------------------------------------------- scale

def realistic_model(args):
    """``index.synthetic.GalleryModel`` fitted to the zero-shot embeddings of a shared set (96 px),
    projected on their top ``--dim`` principal directions; the embeddings are cached in the temp
    folder (a few minutes to compute on one core)."""
    from index.synthetic import fit_gallery_model, similarity_profile
    from retrieval.data import read_folder_gallery

    samples = read_folder_gallery(data_path(args.scale_fit_data))
    cache = Path(tempfile.gettempdir()) / f"whale-bench-{Path(str(args.scale_fit_data)).name}-96px.npy"
    if cache.is_file():
        vectors = np.load(cache)
    else:
        from retrieval.models.embed import embed_images
        from retrieval.models.model import preprocessing_for, zero_shot_model

        model = zero_shot_model()
        vectors = embed_images(model, [s.path for s in samples], preprocessing_for(model, 96),
                               device=torch_device("cpu"), progress=False)
        np.save(cache, vectors)
    labels = np.array([s.identity for s in samples])
    # uncentred: the first direction is the one every GeM feature shares, which sets how similar
    # unrelated images look
    basis = np.linalg.svd(vectors, full_matrices=False)[2][:args.dim]
    projected = vectors @ basis.T
    projected /= np.linalg.norm(projected, axis=1, keepdims=True)
    return fit_gallery_model(projected, labels), similarity_profile(projected, labels)


def bench_scale(args) -> dict:
    import faiss

    from index import GalleryIndex
    from index.synthetic import clustered_float32
    from index import tuning, types
    from index.types import resolve

    started = time.perf_counter()
    if getattr(args, "scale_gallery", "isotropic") == "realistic":
        from index.synthetic import sample_gallery

        model, fitted_to = realistic_model(args)
        gallery, labels, queries, truth = sample_gallery(model, args.scale_size, args.scale_queries)
    else:
        fitted_to = None
        gallery, labels, queries, truth = clustered_float32(args.scale_size, args.dim, args.scale_queries)
    generate_s = time.perf_counter() - started
    from index.synthetic import similarity_profile

    profile = {"generated": similarity_profile(gallery[:200_000], labels[:200_000]),
               "real": fitted_to}
    rows = {}

    def measure(name, build, search_batch, search_one, answer_identities):
        t = time.perf_counter()
        index = build()
        build_s = time.perf_counter() - t
        search_one(index, queries[:10])  # warm-up (first-call costs)
        t = time.perf_counter()
        result = search_batch(index)
        batch_s = time.perf_counter() - t
        t = time.perf_counter()
        for q in queries[:20]:
            search_one(index, q[None])
        single_ms = (time.perf_counter() - t) / 20 * 1000
        ids = answer_identities(result)
        rows[name] = {"build_s": round(build_s, 2), "batch_queries_per_s": round(len(queries) / batch_s, 1),
                      "single_query_ms": round(single_ms, 2),
                      "recall_at_5": float(np.mean([t in set(i) for i, t in zip(ids, truth)]))}
        return index, ids

    def bare_flat():
        index = faiss.IndexFlatIP(args.dim)
        index.add(gallery)
        return index

    def top5_identities(rows_):
        return [list(dict.fromkeys(labels[r][r >= 0]))[:5] for r in rows_]

    engine, engine_ids = measure("GalleryIndex flat", lambda: GalleryIndex(gallery, labels),
                                 lambda ix: ix.search(queries, 5), lambda ix, q: ix.search(q, 5),
                                 lambda r: r.identities)
    wide = 5 * engine.max_images_per_identity
    del engine
    measure("bare faiss IndexFlatIP", bare_flat, lambda ix: ix.search(queries, wide)[1],
            lambda ix, q: ix.search(q, 5), top5_identities)
    approximate = {}
    for kind in args.scale_types:
        built, approximate[kind] = measure(
            f"GalleryIndex {kind}", lambda: GalleryIndex(gallery, labels, kind),
            lambda ix: ix.search(queries, 5), lambda ix, q: ix.search(q, 5), lambda r: r.identities)
        rows[f"GalleryIndex {kind}"]["params"] = resolve(kind, len(gallery), args.dim).params
        # what build_index.py ships: the search parameter tuned to the default target recall
        t = time.perf_counter()
        tuned = tuning.tune(built.cpu_index, built.spec, gallery, labels, search=built.neighbours,
                            set_rerank=lambda factor, b=built: setattr(b, "rerank_factor", factor))
        tune_s = time.perf_counter() - t
        if tuned is not None:
            name = f"GalleryIndex {kind}, tuned to {tuning.DEFAULT_TARGET}"
            _, approximate[f"{kind} tuned"] = measure(
                name, lambda index=built: index, lambda ix: ix.search(queries, 5),
                lambda ix, q: ix.search(q, 5), lambda r: r.identities)
            rows[name].update(build_s=None, tune_s=round(tune_s, 1),
                              params={**rows[f"GalleryIndex {kind}"]["params"],
                                      tuned.param: tuned.value, **tuned.extra},
                              tuning_recall=round(tuned.recall, 4))
            types.apply_search_params(built.cpu_index, resolve(kind, len(gallery), args.dim))
        for nprobe in args.scale_nprobe if kind == "ivf" else []:
            # the same index searched with fewer cells (what editing the manifest's nprobe does)
            def with_nprobe(index=built, n=nprobe):
                faiss.extract_index_ivf(index.faiss_index).nprobe = n
                return index
            name = f"GalleryIndex ivf, nprobe {nprobe}"
            _, approximate[f"ivf nprobe {nprobe}"] = measure(
                name, with_nprobe, lambda ix: ix.search(queries, 5), lambda ix, q: ix.search(q, 5),
                lambda r: r.identities)
            rows[name]["build_s"] = None  # not rebuilt
            rows[name]["params"] = {**rows[f"GalleryIndex {kind}"]["params"], "nprobe": nprobe}
    return {"gallery": len(gallery), "dim": args.dim, "queries": len(queries),
            "generate_s": round(generate_s, 1), "gallery_gib": round(gallery.nbytes / 2 ** 30, 2),
            "gallery_kind": getattr(args, "scale_gallery", "isotropic"), "similarity_profile": profile,
            "rows": rows,
            "top5_overlap_with_exact": {kind: round(float(np.mean(
                [len(set(a) & set(b)) / 5 for a, b in zip(ids, engine_ids)])), 4)
                for kind, ids in approximate.items()}}


# ----------------------------------------------------------------------------- run

def run(args) -> dict:
    report = Report("speed", args, seeds=[0])
    results: dict = {}
    tables = []

    name = "speed" if set(args.parts) >= set(PARTS) - {"scale", "milvus", "write"} else "speed_" + "_".join(args.parts)
    if args.parts == ["write"] and getattr(args, "write_gallery", "isotropic") == "realistic":
        name += f"_{'_'.join(map(str, args.write_sizes))}_realistic"
    if args.parts == ["scale"]:  # one file per size and index types: runs can be split up
        name = f"speed_scale_{args.scale_size}_{'_'.join(['flat'] + list(args.scale_types))}"
        if getattr(args, "scale_gallery", "isotropic") != "isotropic":
            name += f"_{args.scale_gallery}"

    def save():
        report.write(name, getattr(args, "out", None), results=results, table="\n\n".join(tables))

    if "embed" in args.parts:
        e = results["embed"] = bench_embed(args)
        tables.append(format_table(["embedding (images/s)", "value"], [
            ["embed_images (decode+preprocess+forward)", e["images_per_s"]["embed_images"]],
            ["bare forward, random tensors", e["images_per_s"]["bare_forward"]],
            ["decode + preprocess only", e["images_per_s"]["decode_preprocess_only"]],
            ["ratio embed_images / bare forward", e["ratio_embed_over_bare"]]],
            f"embed: {e['images']} images, batch {e['batch']}, {e['image_size']}px, "
            f"{e['workers']} workers"))
        print(tables[-1], flush=True)
        save()
    for n in args.gallery if "search" in args.parts else []:
        s = bench_search(args, n)
        results.setdefault("search", []).append(s)
        rows = [[name, s["batch_queries_per_s"][name], s["single_query_ms"].get(name)]
                for name in s["batch_queries_per_s"]]
        rows.append(["ratio engine / bare (k=5)", s["ratio_engine_over_bare_k5"],
                     s["ratio_single_query_engine_over_bare"]])
        rows.append([f"ratio engine / bare (same k={s['neighbours_asked_by_engine']})",
                     s["ratio_engine_over_bare_same_k"], None])
        tables.append(format_table(["search", "batch q/s", "1-query ms"], rows,
                                   f"search: {s['gallery']} x {s['dim']} gallery, {s['queries']} queries"))
        print(tables[-1], flush=True)
        save()
    for n in args.gallery if "knn" in args.parts else []:
        k = bench_knn(args, n)
        results.setdefault("knn", []).append(k)
        agree = {"faiss IndexFlatIP": 1.0, "numpy matmul + argpartition": k["top5_agreement_with_faiss"]["numpy"],
                 "sklearn NearestNeighbors(brute, cosine)": k["top5_agreement_with_faiss"]["sklearn"]}
        tables.append(format_table(["exact top-5", "q/s", "÷ faiss", "top-5 agreement"],
                                   [[name, qps, k["ratio_over_faiss"][name], agree[name]]
                                    for name, qps in k["queries_per_s"].items()],
                                   f"knn: {k['gallery']} x {k['dim']}, {k['queries']} queries, batched"))
        print(tables[-1], flush=True)
        save()
    if "train" in args.parts:
        t = results["train"] = bench_train(args)
        tables.append(format_table(["training (images/s)", "value"], [
            ["Trainer.train_epoch", t["images_per_s"]["Trainer.train_epoch"]],
            ["minimal PyTorch loop", t["images_per_s"]["minimal loop"]],
            ["ratio Trainer / minimal", t["ratio_trainer_over_minimal"]]],
            f"train: {t['images']} images of {t['identities']} identities, batch {t['batch']}, "
            f"{t['image_size']}px, ArcFace, backbone trained, {t['workers']} workers"))
        print(tables[-1], flush=True)
        save()
    if "query" in args.parts:
        q = results["query"] = bench_query(args)
        if "skipped" in q:
            tables.append(f"query.py: skipped ({q['skipped']})")
        else:
            tables.append(format_table(["query.py, one image (s)", "value"], [
                ["cold (first process)", q["cold_s"]], ["warm (median of next)", q["warm_s"]],
                ["of which: import torch+timm+faiss+albumentations", q["import_torch_timm_faiss_albumentations_s"]],
                ["build_index.py (400 images, once)", q["build_index_s"]]],
                f"query: {q['gallery']}, {q['image_size']}px"))
        print(tables[-1], flush=True)
        save()
    if "serve" in args.parts:
        from .serve_speed import bench_serve

        sv = results["serve"] = bench_serve(args)
        rows = [[f"1 client, gallery {r['gallery']}", r["server"]["p50_ms"], r["server"]["p95_ms"],
                 f"{r['bare']['faiss']['p50_ms']} / {r['bare']['numpy']['p50_ms']}",
                 r["ratio_bare_over_server_p50"], None, None] for r in sv["single"]]
        rows += [[f"{c['clients']} clients, gallery {c['gallery']}, batching {'on' if c['batching'] else 'off'}",
                  c["p50_ms"], c["p95_ms"], None, None, c["queries_per_s"], c["errors"]]
                 for c in sv["concurrent"]]
        cold = sv["cold_query"]
        tables.append(format_table(["serve.py over HTTP", "p50 ms", "p95 ms",
                                    "bare p50 ms (faiss / numpy)", "best bare ÷ server", "q/s",
                                    "errors"], rows,
                                   f"serve: {sv['model']}, {sv['image_size']} px; cold query.py "
                                   f"{cold['wall_s_median']} s, {cold['peak_rss_mb_median']} MB peak "
                                   f"RSS (median of {cold['runs']})"))
        print(tables[-1], flush=True)
        save()
    if "index" in args.parts:
        results["index"] = bench_index(args)
        rows = []
        for block in results["index"]:
            for r in block.get("results", []):
                rows.append([f"{r['type']} @ {block['gallery']}", r["build_s"], r["batch_queries_per_s"],
                             r["single_query_ms"], r["recall_at_k"], r.get("recall_vs_exact")])
            if "failed" in block or "skipped" in block:
                rows.append([f"n={block.get('n')}", None, None, None, None,
                             str(block.get("failed") or block.get("skipped"))])
        tables.append(format_table(["index type @ gallery", "build s", "batch q/s", "1-query ms",
                                    "recall@5", "vs exact"], rows, "index types (bench/index_speed.py)"))
        print(tables[-1], flush=True)
        save()
    if "scale" in args.parts:
        sc = results["scale"] = bench_scale(args)
        tables.append(format_table(["scale: exact vs approximate", "build s", "batch q/s", "1-query ms",
                                    "recall@5", "params"],
                                   [[n, r["build_s"], r["batch_queries_per_s"], r["single_query_ms"],
                                     r["recall_at_5"], r.get("params", "")] for n, r in sc["rows"].items()],
                                   f"scale: {sc['gallery']} x {sc['dim']} float32 ({sc['gallery_gib']} GiB), "
                                   f"{sc['queries']} queries; top-5 overlap with exact "
                                   f"{sc['top5_overlap_with_exact']}"))
        print(tables[-1], flush=True)
        save()
    if "milvus" in args.parts:
        from .milvus_speed import bench_milvus

        results["milvus"] = {}
        bench_milvus(args, results["milvus"], save)
        for size, block in results["milvus"].items():
            tables.append(format_table(
                ["milvus part: backend, type", "build / write s", "batch q/s", "1-query ms",
                 "recall@5", "top-5 = exact", "params"],
                [[name, r["build_s"], r["batch_queries_per_s"], r["single_query_ms"],
                  r["recall_at_5"], r["top5_overlap_with_exact"], r["params"]]
                 for name, r in block["rows"].items()],
                f"milvus: {block['gallery']} x {block['dim']} synthetic vectors, {block['queries']} "
                f"queries, k = 5 identities"))
            print(tables[-1], flush=True)
        save()
    if "write" in args.parts:
        from .write_speed import bench_write

        results["write"] = bench_write(args, realistic_model)
        for size, block in results["write"].items():
            tables.append(format_table(
                ["write part: index type", "write s", "peak anon MiB", "÷ raw vectors",
                 "loaded anon MiB", "cold batch q/s", "batch q/s", "1-query ms", "recall@5",
                 "top-5 = exact"],
                [[f"{kind} ({r['params']['kind']})", r["write_s"], r["peak_anon_mib"],
                  r["peak_share_of_raw"], r["loaded_anon_mib"], r["cold_batch_queries_per_s"],
                  r["batch_queries_per_s"],
                  r["single_query_ms"], r["recall_at_5"], r["top5_overlap_with_exact"]]
                 for kind, r in block["rows"].items()],
                f"write: save_index on a memory-mapped {block['gallery_kind']} {block['gallery']} x "
                f"{block['dim']} gallery ({block['raw_mib']} MiB), {block['queries']} queries, "
                f"exact search's recall@5 {block['exact_recall_at_5']}"))
            print(tables[-1], flush=True)
        save()
    save()
    return results
