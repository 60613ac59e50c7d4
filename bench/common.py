"""Shared by every suite: the machine and library record, JSON writing, tables, data sets.

Each suite's JSON holds, beside its own numbers: ``machine`` (CPU model, cores, load average when
it started and ended, memory), ``versions`` (the libraries that produced the numbers), ``command``
(how to run it again), ``seeds`` and the wall time. Files are written atomically (``*.tmp`` then a
rename), so an interrupted run never leaves half a JSON behind.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shlex
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DATA_ROOT = ROOT.parent / "shared" / "data"
DATA_SETS = {
    "omniglot": DATA_ROOT / "omniglot" / "images_background_small1",
    "orl": DATA_ROOT / "orl_faces",
    "dogfacenet": DATA_ROOT / "dogfacenet",
    "grocery": DATA_ROOT / "grocery",
}
LIBRARIES = ("torch", "torchvision", "timm", "pytorch-metric-learning", "faiss-gpu", "faiss-cpu",
             "numpy", "scikit-learn", "albumentations", "opencv-python-headless", "pillow",
             "open-metric-learning")


def set_threads(threads: int) -> None:
    """Cap every thread pool (torch, OpenMP for FAISS, BLAS) at ``threads``.

    The environment variables only take effect for libraries not yet loaded, so ``__main__`` sets
    them before anything heavy is imported; this also sets the runtime knobs of loaded ones.
    """
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(threads)
    import torch
    torch.set_num_threads(threads)
    try:
        import faiss
        faiss.omp_set_num_threads(threads)
    except ImportError:
        pass


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
        "platform": platform.platform(), "python": platform.python_version(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or None,
    }
    try:
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        total = next(line for line in meminfo if line.startswith("MemTotal"))
        info["memory_gib"] = round(int(total.split()[1]) / 2 ** 20, 1)
    except (OSError, StopIteration):
        pass
    try:
        import torch
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.is_available()
    except ImportError:
        pass
    return info


def library_versions(names: Iterable[str] = LIBRARIES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def command_line() -> str:
    """How this run was started, as one could paste it again from the repository root."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(os.path.join("bench", "__main__.py")):
        argv = ["-m", "bench"] + argv[1:]
    return shlex.join(["python"] + argv)


def data_path(name: str) -> Path:
    if name in DATA_SETS:
        return DATA_SETS[name]
    return Path(name)  # any folder-per-identity gallery


class Report:
    """One suite run: collects the record and writes ``bench/results/<name>.json`` at the end."""

    def __init__(self, suite: str, args: Any, seeds: Sequence[int] | None = None):
        self.suite = suite
        self.tag = getattr(args, "tag", None)  # "quick" under `all --quick`: keeps full runs' files
        self.started = time.time()
        self.record: dict[str, Any] = {
            "suite": suite, "command": command_line(),
            "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                        if not callable(v)},
            "seeds": list(seeds) if seeds is not None else None,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine_info(), "versions": library_versions(),
            "note": "timings taken on a shared 2-core machine with other engineers' jobs running: "
                    "compare ratios measured in the same run, not absolute numbers across runs",
        }

    def write(self, name: str, out: str | Path | None = None, **payload: Any) -> Path:
        self.record.update(payload)
        self.record["wall_s"] = round(time.time() - self.started, 1)
        self.record["machine"]["load_average_1m_end"] = round(os.getloadavg()[0], 2)
        folder = Path(out) if out else RESULTS
        folder.mkdir(parents=True, exist_ok=True)
        if self.tag and not name.endswith(f"_{self.tag}"):
            name = f"{name}_{self.tag}"
        path = folder / f"{name}.json"
        temp = path.with_name(path.name + ".tmp")
        temp.write_text(json.dumps(self.record, indent=2, default=_jsonable) + "\n")
        os.replace(temp, path)
        if "table" in payload:
            text = folder / f"{name}.txt"
            temp = text.with_name(text.name + ".tmp")
            temp.write_text(f"$ {self.record['command']}\n{payload['table']}\n")
            os.replace(temp, text)
        print(f"(written to {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path})",
              flush=True)
        return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for one value): the protocol's "spread"."""
    values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not values:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(values)}


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    """A plain aligned text table (first column left-aligned, the others right-aligned)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    def line(values):
        return "  ".join(v.ljust(widths[0]) if i == 0 else v.rjust(widths[i])
                         for i, v in enumerate(values))
    out = [title] if title else []
    out += [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 1000:
            return f"{value:.0f}"
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.3g}" if value != 0 and abs(value) < 0.001 else f"{value:.3f}"
    return str(value)


def pm(stats: dict[str, float], digits: int = 3) -> str:
    if not stats or stats.get("n", 0) == 0:
        return "-"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def quiet_logs(progress: bool = False) -> None:
    """Keep the engine's INFO lines (one per epoch); without ``progress``, no tqdm bars."""
    import logging

    from retrieval import progress as engine_progress

    engine_progress.set_enabled(progress)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("PIL", "matplotlib", "timm", "faiss", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def suite_config(args: Any, loss: str, seed: int, out: Path) -> "TrainConfig":
    """The engine's run config for one benchmark run: the suite's flags over ``TrainConfig``'s
    defaults. The frozen warm-up is capped below the epoch count, so short runs still train the
    backbone; ``refit`` is the engine's default unless the suite was given ``--no-refit``."""
    from retrieval.config import TrainConfig

    defaults = TrainConfig()
    warmup = getattr(args, "warmup_epochs", None)
    warmup = defaults.warmup_epochs if warmup is None else warmup
    return TrainConfig(out=str(out), backbone=getattr(args, "backbone", None) or defaults.backbone,
                       image_size=args.image_size, loss=loss, epochs=args.epochs,
                       warmup_epochs=max(0, min(warmup, args.epochs - 1)),
                       refit=getattr(args, "refit", defaults.refit), seed=seed,
                       num_workers=args.workers, device=getattr(args, "device", None))


def whole_backbone(config: "TrainConfig") -> "TrainConfig":
    """``config`` training the whole backbone: the softmax baseline and the peers take the
    engine's recipe but not its choice of depth on validation (a second selection run they do
    not make)."""
    from dataclasses import replace

    return replace(config, trainable_blocks=0)


def torch_device(name: str | None) -> "torch.device":
    """``--device`` as a torch device; None: the first GPU where torch sees one, else the CPU."""
    import torch

    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def label_array(identities: Sequence[str]) -> "np.ndarray":
    """Identity names -> int labels (sorted names), as pml's and OML's metric code want them."""
    import numpy as np

    names = sorted(set(identities))
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[i] for i in identities], dtype=np.int64)
