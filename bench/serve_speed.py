"""The warm service over HTTP, and the cold query.py, measured as users meet them.

* **single client**: p50 / p95 latency of ``POST /query`` for one ORL photo against a real
  zero-shot index (400 ORL faces at ``--image-size``) topped up with synthetic vectors (real
  vectors plus noise, re-normalised, under synthetic identities) to each ``--serve-gallery`` size;
  beside the bare work the same answer needs in-process (decode + preprocess + ONNX forward +
  FAISS flat search): ``bare ÷ server`` says what HTTP, the upload and the folding cost.
* **concurrent clients**: ``--serve-clients`` threads posting for ``--serve-seconds``, with and
  without dynamic batching: throughput, p95, errors. The clients run in this process and share
  the machine's cores with the server, as any load generator on a 2-core box would.
* **cold query.py**: wall time and peak RSS of whole processes, median of ``--query-runs``.
"""
from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from .common import ROOT, data_path


def _percentiles(samples: list[float]) -> dict[str, float]:
    ms = np.asarray(samples) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p95_ms": round(float(np.percentile(ms, 95)), 2), "n": len(samples)}


def _build_real_index(folder: Path, image_size: int, env: dict) -> None:
    subprocess.run([sys.executable, "build_index.py", "--gallery", str(data_path("orl")),
                    "--image-size", str(image_size), "--out", str(folder), "--no-progress"],
                   cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=1800)


def _topped_up(real: Path, folder: Path, size: int) -> Path:
    """A copy of the real index with synthetic vectors added up to ``size`` images."""
    from index.store import load_index, save_index

    stored = load_index(real)
    vectors = stored.vectors()
    extra = size - len(vectors)
    if extra > 0:
        rng = np.random.default_rng(0)
        base = vectors[rng.integers(0, len(vectors), extra)]
        noisy = base + rng.normal(scale=0.05, size=base.shape).astype(np.float32)
        noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
        vectors = np.concatenate([vectors, noisy.astype(np.float32)])
    names = [f"/synthetic/{i:07d}.png" for i in range(max(0, extra))]
    manifest = stored.manifest
    save_index(folder, vectors, stored.paths + names,
               stored.identities + [f"syn{i // 3:06d}" for i in range(len(names))],
               model=manifest.model, tta=manifest.tta, threshold=manifest.threshold,
               threshold_source=manifest.threshold_source,
               attachments={n: stored.attachment(n) for n in manifest.attachments})
    return folder


class _Server:
    def __init__(self, index: Path, env: dict, batching: bool):
        import httpx

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "serve.py", "--index", str(index), "--port", str(self.port)]
        self.process = subprocess.Popen(command + ([] if batching else ["--no-batching"]), cwd=ROOT,
                                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started = time.perf_counter()
        while True:
            if self.process.poll() is not None:
                raise RuntimeError("serve.py exited at start")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    self.start_s = time.perf_counter() - started
                    return
            except httpx.HTTPError:
                time.sleep(0.1)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)


def _single_client(url: str, image: bytes, requests: int) -> list[float]:
    import httpx

    times = []
    with httpx.Client(base_url=url) as client:
        for i in range(requests + 5):
            started = time.perf_counter()
            response = client.post("/query", files={"image": ("q.pgm", image)}, data={"k": "5"})
            elapsed = time.perf_counter() - started
            response.raise_for_status()
            if i >= 5:  # the first few warm up caches and connections
                times.append(elapsed)
    return times


def _concurrent(url: str, images: list[bytes], clients: int, seconds: float) -> dict:
    import httpx

    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client_loop(offset: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            i = offset
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    ok = client.post("/query", files={"image": ("q.pgm", images[i % len(images)])},
                                     data={"k": "5"}).status_code == 200
                except Exception:
                    ok = False
                with lock:
                    latencies.append(time.perf_counter() - started)
                    errors[0] += not ok
                i += clients

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return {"clients": clients, "seconds": round(wall, 1), "requests": len(latencies),
            "queries_per_s": round(len(latencies) / wall, 1), "errors": errors[0],
            **_percentiles(latencies)}


def _bare(index: Path, image: bytes, requests: int) -> dict[str, list[float]]:
    """Decode + preprocess + ONNX forward + an exact top-15 search, in process: the floor. The
    search is either FAISS's flat index or a NumPy matrix product + partial sort."""
    import faiss

    from index.store import load_index
    from retrieval.answering.query import encoder_for
    from retrieval.answering.service import decode_upload

    stored = load_index(index)
    encoder = encoder_for(stored)
    vectors = stored.vectors()
    flat = faiss.IndexFlatIP(stored.manifest.dim)
    flat.add(vectors)
    searches = {"faiss": lambda v: flat.search(v, 15),
                "numpy": lambda v: np.argpartition(-(vectors @ v[0]), 15)[:15]}
    times: dict[str, list[float]] = {name: [] for name in searches}
    for i in range(requests + 5):
        for name, search in searches.items():
            started = time.perf_counter()
            search(encoder.encode_arrays([decode_upload(image)]))
            if i >= 5:
                times[name].append(time.perf_counter() - started)
    return times


# Started from a small launcher: a child forked straight from this (large) process would count
# this process's resident pages as its own until it execs, inflating its peak RSS.
_LAUNCHER = ("import resource, subprocess, sys, time\n"
             "t = time.perf_counter()\n"
             "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL,\n"
             "                      stderr=subprocess.DEVNULL).returncode\n"
             "wall = time.perf_counter() - t\n"
             "print(code, wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")


def _run_measured(command: list[str], env: dict) -> tuple[float, int]:
    """Wall seconds and peak RSS (MB) of one whole process."""
    out = subprocess.run([sys.executable, "-c", _LAUNCHER, *command], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    if out[0] != "0":
        raise RuntimeError(f"{command[1]} failed with exit code {out[0]}")
    return float(out[1]), round(int(out[2]) / 1024)


def cold_query(index: Path, image: Path, runs: int, env: dict) -> dict:
    command = [sys.executable, "query.py", str(image), "--index", str(index)]
    measured = [_run_measured(command, env) for _ in range(runs)]
    walls, rss = [m[0] for m in measured], [m[1] for m in measured]
    return {"runs": runs, "wall_s_median": round(statistics.median(walls), 3),
            "wall_s": [round(w, 3) for w in walls], "peak_rss_mb_median": statistics.median(rss),
            "peak_rss_mb": rss}


def bench_serve(args) -> dict:
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    orl = data_path("orl")
    query_image = sorted((orl / "s1").glob("*.pgm"))[0]
    image = query_image.read_bytes()
    mixed = [p.read_bytes() for p in sorted(orl.glob("s*/1*.pgm"))[:16]]
    result: dict = {"image_size": args.image_size, "model": "zero-shot tf_efficientnet_lite0 + GeM",
                    "single": [], "concurrent": []}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as temp:
        real = Path(temp) / "real"
        _build_real_index(real, args.image_size, env)
        result["cold_query"] = cold_query(real, query_image, args.query_runs, env)
        for size in args.serve_gallery:
            index = _topped_up(real, Path(temp) / f"g{size}", size)
            server = _Server(index, env, batching=True)
            try:
                served = _single_client(server.url, image, args.serve_requests)
            finally:
                server.stop()
            bare = {name: _percentiles(t) for name, t in _bare(index, image, args.serve_requests).items()}
            s = _percentiles(served)
            floor = min(b["p50_ms"] for b in bare.values())
            result["single"].append({"gallery": size, "server": s, "bare": bare,
                                     "server_start_s": round(server.start_s, 2),
                                     "ratio_bare_over_server_p50": round(floor / s["p50_ms"], 3)})
        index = Path(temp) / f"g{args.serve_gallery[0]}"
        for batching in (False, True):
            server = _Server(index, env, batching=batching)
            try:
                run = _concurrent(server.url, mixed, args.serve_clients, args.serve_seconds)
            finally:
                server.stop()
            result["concurrent"].append({"gallery": args.serve_gallery[0], "batching": batching, **run})
    return result
