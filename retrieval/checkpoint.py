"""Checkpoints: written atomically, read back with errors that say what to do.

A checkpoint holds everything needed to rebuild the model and its preprocessing (``model_spec``),
the calibrated ``new_whale`` threshold, and, for resuming, the optimiser and loss states.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import UserError

FORMAT = "whale-retrieval-checkpoint/1"


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write via a temporary file in the same folder, then rename: a crash leaves the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(Path(temp))
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def state_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """A short hash of the weights: an index records it to refuse queries from another model."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        digest.update(key.encode())
        digest.update(state_dict[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    payload = {"format": FORMAT, **payload}
    atomic_write(path, lambda temp: torch.save(payload, temp))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: pass the model.pt written by train_embed.py")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise UserError(f"checkpoint {path} is corrupt or truncated ({type(err).__name__}): "
                        "retrain, or use another checkpoint") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path} is not a checkpoint of this project (expected format {FORMAT}): "
                        "pass a model.pt written by train_embed.py")
    return payload


def load_model(path: str | Path):
    """Rebuild the model and its preprocessing from a checkpoint: (model, preprocessing, payload)."""
    from .model import create_model, spec_from_dict

    payload = load_checkpoint(path)
    config, preprocessing = spec_from_dict(payload)
    model = create_model(config, pretrained=False)
    model.load_state_dict(payload["state_dict"])
    return model.eval(), preprocessing, payload
