"""The index write path on a gallery larger than what should be copied: time and peak memory of
``save_index`` on a memory-mapped gallery, then recall of the written index.

  python -m bench speed --parts write --write-sizes 1000000 --write-types ivfpq
  python -m bench speed --parts write --write-sizes 10000000 --write-types auto \
      --write-gallery realistic --write-dir /big/disk     # 10M: 20 GB of vectors, twice on disk

The scale part's isotropic (or, with ``--write-gallery realistic``, realistic) galleries are
written into a ``.npy`` file and re-opened memory-mapped, as ``--append`` reads a stored index. ``save_index`` then checks, sorts (every row moves: the paths
are numbered backwards) and writes them, and builds the index from its own file. Peak memory is the
process's anonymous resident memory (``RssAnon``: what cannot be dropped, unlike the page cache of
the mapped files), sampled every 20 ms, above what it held before the write. Recall@5 of the true
identity and top-5 agreement with exact search come from 1,000 queries through the loaded index,
with the batch rate (the first pass from a cold page cache, the second warm: the rate reported)
and one query's latency (the mean of 20). The source gallery file is deleted before the last
type is loaded, so the index's raw vectors have the page cache to themselves, as deployed. The
loaded index's memory is its anonymous resident memory after loading (the codes; raw vectors
stay memory-mapped).
"""
from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

MODEL = {"fingerprint": "0000000000000000", "source": "pretrained",
         "model_config": {"backbone": "tf_efficientnet_lite0", "embedding_dim": 0, "gem_p": 3.0},
         "preprocessing": {"image_size": 96, "mean": [0.5] * 3, "std": [0.5] * 3,
                           "interpolation": "bicubic"}}


def rss_anon_bytes() -> int:
    """This process's anonymous resident memory (Linux ``/proc/self/status``), 0 elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakMemory:
    """The highest ``rss_anon_bytes`` seen while the ``with`` block runs, above its start."""

    def __init__(self, every_s: float = 0.02):
        self.every_s, self.peak, self.start = every_s, 0, 0
        self._stop = threading.Event()

    def _watch(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, rss_anon_bytes() - self.start)

    def __enter__(self) -> "PeakMemory":
        self.start = rss_anon_bytes()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_bytes() - self.start)


def _generate(args, n: int, target: np.ndarray, realistic_model):
    """Fill the memory map ``target`` with ``n`` gallery vectors; (labels, queries, truth)."""
    if getattr(args, "write_gallery", "isotropic") == "realistic":
        from index.synthetic import sample_gallery

        model, _ = realistic_model(args)
        _, labels, queries, truth = sample_gallery(model, n, args.write_queries, out=target)
        return labels, queries, truth
    from index.synthetic import clustered_float32

    _, labels, queries, truth = clustered_float32(n, args.dim, args.write_queries, out=target)
    return labels, queries, truth


def bench_write(args, realistic_model=None) -> dict:
    """``realistic_model``: ``bench.speed.realistic_model`` (passed in: speed imports this
    module), for ``--write-gallery realistic``."""
    from index import tuning
    from index.store import load_index, save_index

    results = {}
    for n in args.write_sizes:
        folder = Path(tempfile.mkdtemp(prefix="bench-write-", dir=getattr(args, "write_dir", None)))
        try:
            target = np.lib.format.open_memmap(folder / "gallery.npy", mode="w+", dtype=np.float32,
                                               shape=(n, args.dim))
            started = time.perf_counter()
            labels, queries, truth = _generate(args, n, target, realistic_model)
            generate_s = time.perf_counter() - started
            target.flush()
            del target
            gallery = np.load(folder / "gallery.npy", mmap_mode="r")[:len(labels)]
            paths = [f"/gallery/{i:09d}.jpg" for i in range(len(labels), 0, -1)]  # all rows move
            largest = int(np.unique(labels.astype(str), return_counts=True)[1].max())
            _, exact_rows = tuning.exact_blocked(queries, gallery, 5 * largest)
            exact = [list(dict.fromkeys(labels[r]))[:5] for r in exact_rows]
            rows = {}
            raw_bytes = gallery.nbytes
            for number, kind in enumerate(args.write_types):
                started = time.perf_counter()
                with PeakMemory() as peak:
                    manifest = save_index(folder / kind, gallery, paths, list(labels), model=MODEL,
                                          tta="none", threshold=None, index_type=kind)
                write_s = time.perf_counter() - started
                if number == len(args.write_types) - 1:
                    # the source copy is done with: a deployed index has the page cache to itself
                    del gallery
                    (folder / "gallery.npy").unlink()
                before = rss_anon_bytes()
                stored = load_index(folder / kind)
                loaded_mib = (rss_anon_bytes() - before) / 2 ** 20
                stored.gallery.search(queries[:10], 5)  # warm-up
                batch_s = []
                for _ in range(2):  # first from a cold page cache of the raw vectors, then warm
                    started = time.perf_counter()
                    ranked = stored.gallery.search(queries, 5).identities
                    batch_s.append(time.perf_counter() - started)
                started = time.perf_counter()
                for query in queries[:20]:
                    stored.gallery.search(query[None], 5)
                single_ms = (time.perf_counter() - started) / 20 * 1000
                rows[kind] = {
                    "write_s": round(write_s, 1), "peak_anon_mib": round(peak.peak / 2 ** 20),
                    "peak_share_of_raw": round(peak.peak / raw_bytes, 3),
                    "loaded_anon_mib": round(loaded_mib),
                    "cold_batch_queries_per_s": round(len(queries) / batch_s[0], 1),
                    "batch_queries_per_s": round(len(queries) / batch_s[1], 1),
                    "single_query_ms": round(single_ms, 2),
                    "recall_at_5": round(float(np.mean([t in a for a, t in zip(ranked, truth)])), 4),
                    "top5_overlap_with_exact": round(float(np.mean(
                        [len(set(a) & set(e)) / 5 for a, e in zip(ranked, exact)])), 4),
                    "params": manifest.index}
                del stored
                shutil.rmtree(folder / kind)
            exact_recall = float(np.mean([t in e for e, t in zip(exact, truth)]))
            results[str(n)] = {"gallery": len(labels), "dim": args.dim, "raw_mib": round(raw_bytes / 2 ** 20),
                               "gallery_kind": getattr(args, "write_gallery", "isotropic"),
                               "generate_s": round(generate_s, 1),
                               "exact_recall_at_5": round(exact_recall, 4),
                               "queries": len(queries), "rows": rows}
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return results
