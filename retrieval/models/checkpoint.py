"""Checkpoints: written atomically, read back safely, with errors that say what to do.

A checkpoint holds everything needed to rebuild the model and its preprocessing (``model_spec``),
the calibrated ``new_whale`` threshold, and, for resuming, the optimiser and loss states.

People share trained models, so reading one must never run code: the file is a ``torch.save``
zip read with ``torch.load(weights_only=True)``, whose unpickler only rebuilds tensors and plain
values (dict, list, tuple, str, int, float, bool, None) and refuses every other Python object.
``save_checkpoint`` enforces the same rule when writing, so every file this project writes can be
read back that way. After loading, the layout is checked (``validate_payload``) and the weights
are hashed again: a file whose weights do not match its recorded fingerprint is refused.
"""
from __future__ import annotations

import hashlib
import pickle
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import UserError
from ..files import atomic_write

FORMAT = "whale-retrieval-checkpoint/1"
PLAIN_TYPES = (str, int, float, bool, type(None))


def state_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A short hash of the weights: an index records it to refuse queries from another model."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        digest.update(key.encode())
        digest.update(state_dict[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    payload = {"format": FORMAT, **payload}
    _require_plain(payload, "payload")
    atomic_write(path, lambda temp: torch.save(payload, temp))


def _require_plain(value: Any, where: str) -> None:
    """Refuse (as a programming error) anything ``weights_only`` loading would reject later,
    such as a NumPy scalar in the metrics: better now than an unloadable model after training."""
    if isinstance(value, torch.Tensor) or type(value) in PLAIN_TYPES:  # not np.float64 & co
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if type(key) not in PLAIN_TYPES:
                raise TypeError(f"checkpoint {where} has a key of type {type(key).__name__}")
            _require_plain(item, f"{where}[{key!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _require_plain(item, f"{where}[{i}]")
        return
    raise TypeError(f"checkpoint {where} is a {type(value).__name__}: only tensors and plain "
                    "values (dict, list, tuple, str, int, float, bool, None) can be saved")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint without running any code from it, and check its layout."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: pass the model.pt written by train_embed.py")
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols: we say it in one line
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(f"checkpoint {path} was refused: it holds Python objects other than "
                        f"tensors and plain values ({_refused_object(err)}), which could run code "
                        f"when loaded; only load checkpoints written by train_embed.py") from None
    except Exception as err:
        raise UserError(f"checkpoint {path} is corrupt or truncated ({type(err).__name__}): "
                        "retrain, or use another checkpoint") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path} is not a checkpoint of this project (expected format {FORMAT}): "
                        "pass a model.pt written by train_embed.py")
    validate_payload(payload, path)
    return payload


def _refused_object(err: Exception) -> str:
    """What torch's safe unpickler refused, e.g. ``GLOBAL posix.system``."""
    import re

    found = re.search(r"(GLOBAL [\w.]+|Unsupported operand \d+)", str(err))
    return found.group(1) if found else "an object outside the allow-list"


# key -> (types allowed, required)
_LAYOUT: dict[str, tuple[tuple[type, ...], bool]] = {
    "model_config": ((dict,), True),
    "preprocessing": ((dict,), True),
    "state_dict": ((dict,), True),
    "fingerprint": ((str,), True),
    "threshold": ((float, int, type(None)), False),
    "hubness": ((float, int), False),
    "whiten": ((bool,), False),
    "identities": ((list,), False),
    "train_config": ((dict,), False),
    "stage": ((str,), False),
    "epoch": ((int,), False),
    "metrics": ((dict,), False),
    "trainer": ((dict,), False),
    "selection": ((dict,), False),
}


def validate_payload(payload: dict[str, Any], path: str | Path) -> None:
    """Every key a model needs is there with the right type (one line naming the first that is
    not), the weights are tensors, and they hash to the recorded fingerprint."""
    for key, (allowed, required) in _LAYOUT.items():
        if key not in payload:
            if required:
                raise _damaged(path, f"no '{key}'")
            continue
        if not isinstance(payload[key], allowed):
            raise _damaged(path, f"'{key}' is a {type(payload[key]).__name__}")
    hubness = payload.get("hubness", 0.0)
    if isinstance(hubness, bool) or not 0.0 <= hubness <= 1.0:  # NaN fails too
        raise _damaged(path, f"'hubness' is {hubness!r}, not a weight from 0 to 1")
    state = payload["state_dict"]
    if not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise _damaged(path, "'state_dict' is not a mapping of names to tensors")
    if state_fingerprint(state) != payload["fingerprint"]:
        raise _damaged(path, "its weights do not match their recorded fingerprint")


def _damaged(path: str | Path, detail: str) -> UserError:
    return UserError(f"checkpoint {path} is damaged or was edited ({detail}): retrain, or use the "
                     "model.pt written by train_embed.py")


def load_model(path: str | Path):
    """Rebuild the model and its preprocessing from a checkpoint: (model, preprocessing, payload)."""
    return model_from_payload(load_checkpoint(path), path)


def model_from_payload(payload: dict[str, Any], path: str | Path):
    """(model, preprocessing, payload) from a checkpoint already read (``load_checkpoint``), so
    a caller that has the payload in hand does not read the file twice; ``path`` names it in
    errors."""
    from .model import create_model, spec_from_dict

    config, preprocessing = spec_from_dict(payload, f"checkpoint {path}")
    model = create_model(config, pretrained=False)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:  # missing / unexpected keys, wrong shapes
        detail = str(err).splitlines()[1].strip()[:160] if "\n" in str(err) else str(err)[:160]
        raise _damaged(path, f"weights do not fit a {config.backbone} of embedding size "
                             f"{config.embedding_dim}: {detail}") from None
    return model.eval(), preprocessing, payload
