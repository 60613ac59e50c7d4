"""Helpers for the index / build / query tests: tiny galleries copied from the real data sets,
cheap checkpoints, and running the CLIs as a user would (synthetic embeddings: index.synthetic)."""
from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import sys
import threading
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 64  # tiny inputs keep the real-data tests fast on a 2-core CPU


def single_threaded():
    """Generator for a fixture: torch and FAISS on one thread while a test module runs.

    On this shared 2-core machine another job often keeps both cores busy; OpenMP threads then
    spin against it and a 2-thread forward pass ran 4x slower than a 1-thread one. One thread
    keeps the tests' runtime predictable (the CLI subprocesses get OMP_NUM_THREADS=1 likewise).
    """
    import faiss
    import torch

    threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(faiss_threads)


def writers_beside_a_reader(read: Callable[[threading.Event], None],
                            writers: Sequence[Callable[[], None]]) -> None:
    """Start ``read(stop)`` on a thread (it loops until ``stop`` is set), then each writer on its
    own thread; once every writer has returned, stop the reader and wait for it."""
    stop = threading.Event()
    reader = threading.Thread(target=read, args=(stop,))
    threads = [threading.Thread(target=write) for write in writers]
    reader.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    reader.join()


def copy_gallery(samples, folder: Path, identities: Sequence[str], per_identity: int,
                 skip: int = 0) -> Path:
    """folder/<identity>/<file>: ``per_identity`` images (after ``skip``) of each identity."""
    by_identity: dict[str, list] = {}
    for sample in samples:
        by_identity.setdefault(sample.identity, []).append(sample)
    for identity in identities:
        chosen = sorted(by_identity[identity], key=lambda s: s.path.name)[skip:skip + per_identity]
        for sample in chosen:
            target = folder / identity / sample.path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(sample.path, target)
    return folder


def make_checkpoint(path: Path, seed: int = 0, threshold: float | None = 0.5,
                    embedding_dim: int = 32, pretrained_share: float = 0.0) -> Path:
    """A checkpoint shaped like ``retrieval.training.train.checkpoint_payload``: pretrained backbone,
    random neck (``seed`` makes different models), preprocessing at 64 px; ``pretrained_share``
    > 0 blends in the untrained features, whitened by a map fitted on random labelled vectors."""
    import torch

    from retrieval.models.checkpoint import save_checkpoint, state_fingerprint
    from retrieval.models.model import (
        ModelConfig,
        create_model,
        model_spec,
        preprocessing_for,
    )

    torch.manual_seed(seed)
    model = create_model(ModelConfig(embedding_dim=embedding_dim), pretrained=True).eval()
    if pretrained_share:
        import numpy as np

        from retrieval.models.model import (pooled_width, stage_indices, untrained_pool_stages,
                                            with_pretrained_share)
        from retrieval.models.whitening import Whitening, fit_within_identity

        width = pooled_width(model.backbone, stage_indices(model.backbone,
                                                           untrained_pool_stages(model.backbone)))
        vectors = np.random.default_rng(seed).normal(size=(40, width)).astype(np.float32)
        whitening = Whitening.from_fit(*fit_within_identity(vectors, [str(i // 2) for i in range(40)]))
        model = with_pretrained_share(model, pretrained_share, whitening=whitening).eval()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_checkpoint(path, {**model_spec(model, preprocessing_for(model, IMAGE_SIZE)),
                           "state_dict": state, "fingerprint": state_fingerprint(state),
                           "threshold": threshold, "identities": [], "train_config": {},
                           "stage": "refit", "epoch": 1, "metrics": {}})
    return path


def run_cli(*args: str | Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a repo CLI (``build_index.py`` / ``query.py``) with this interpreter, from the repo root."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def torchrun(*args: str | Path, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone`` (a free port, so parallel runs on this machine do not collide)."""
    runner = Path(sys.executable).parent / "torchrun"
    return subprocess.run([str(runner), "--standalone", f"--nproc_per_node={nproc}",
                           *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, no traceback, exactly one stderr line starting 'error: ' (logging lines aside)."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


class _Images(HTMLParser):
    """Collects the ``src`` of every <img>."""

    def __init__(self):
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs).get("src", ""))


def check_html(path: Path, expected_images: int) -> None:
    """Parse the page: exactly ``expected_images`` <img>, each a data: URI holding a real JPEG."""
    parser = _Images()
    parser.feed(path.read_text(encoding="utf-8"))
    assert len(parser.sources) == expected_images
    from PIL import Image

    for source in parser.sources:
        assert source.startswith("data:image/jpeg;base64,"), source[:40]
        with Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1], validate=True))) as image:
            image.verify()
