"""The index folder under real crashes and real concurrency, in separate processes:
``kill -9`` at random moments of rebuilds leaves the old or the new index whole, and writers
appending at the same time (one through a symlink) lose nothing and duplicate nothing."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from index.store import load_index, read_manifest

from .index_helpers import ROOT

pytestmark = pytest.mark.slow

WRITER = r"""
import sys, numpy as np
from index.store import save_index, writer_lock, load_index
folder, mode, tag, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model = {"fingerprint": "crashtest", "source": "pretrained", "checkpoint": None}
rng = np.random.default_rng(abs(hash(tag)) % 2**32)

def unit(n):
    v = rng.normal(size=(n, 64)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)

for r in range(rounds):
    if mode == "rebuild":  # sizes alternate, so old and new are told apart by their count
        n = 3000 if r % 2 else 2000
        save_index(folder, unit(n), [f"/g/{i:05d}.png" for i in range(n)],
                   [f"id{i // 2}" for i in range(n)], model=model, tta="none", threshold=0.5)
    else:  # append one image under the lock: read, add, write
        with writer_lock(folder) as real:
            try:
                current = load_index(real)
                vectors, paths, ids = current.vectors(), current.paths, current.identities
            except Exception:
                vectors, paths, ids = np.zeros((0, 64), np.float32), [], []
            save_index(real, np.vstack([vectors, unit(1)]), paths + [f"/g/{tag}-{r:03d}.png"],
                       ids + [f"{tag}-{r:03d}"], model=model, tta="none", threshold=0.5)
    print("done", r, flush=True)
"""


def start_writer(folder, mode: str, tag: str, rounds: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", WRITER, str(folder), mode, tag, str(rounds)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_kill_9_during_rebuilds_always_leaves_a_whole_index(tmp_path):
    folder = tmp_path / "idx"
    first = start_writer(folder, "rebuild", "seed", 1)
    assert first.wait(timeout=120) == 0, first.stderr.read()
    (folder / "notes.txt").write_text("mine")
    rng = random.Random(0)
    for round_ in range(8):
        writer = start_writer(folder, "rebuild", f"r{round_}", 50)
        writer.stdout.readline()  # imports done and one rebuild finished: now kill mid-stream
        time.sleep(rng.uniform(0.0, 0.3))
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=60)
        stored = load_index(folder)  # whole: every checksum matches, counts agree
        assert stored.manifest.counts["images"] in (2000, 3000)
        assert len(stored.vectors()) == stored.manifest.counts["images"]
    assert (folder / "notes.txt").read_text() == "mine"
    data_dirs = [p for p in folder.iterdir() if p.name.startswith("data-")]
    assert read_manifest(folder).data_dir in {p.name for p in data_dirs}


def test_concurrent_appends_lose_nothing_and_duplicate_nothing(tmp_path):
    folder = tmp_path / "idx"
    os.symlink(folder, tmp_path / "link")  # two spellings of one index, one lock
    writers = [start_writer(folder, "append", "a", 12), start_writer(tmp_path / "link", "append", "b", 12)]
    for writer in writers:
        assert writer.wait(timeout=300) == 0, writer.stderr.read()
    stored = load_index(folder)
    expected = sorted(f"/g/{tag}-{r:03d}.png" for tag in "ab" for r in range(12))
    assert stored.paths == expected  # sorted, each exactly once
    assert len(np.unique(stored.vectors(), axis=0)) == 24
