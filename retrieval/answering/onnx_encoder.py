"""The index's model exported as an ONNX graph, for a query path that starts in about a second.

Why ONNX and not TorchScript: on the machines here ``import torch`` alone takes 2.0–2.5 s and
900 MB of resident memory (the CUDA build maps its GPU libraries even on a CPU machine), more than
the whole budget of a cold ``query.py`` (1.5 s, 500 MB). onnxruntime imports in 0.16 s and 47 MB.
An ONNX file is also a data format: loading it runs no code from it, like the index's other files.

* ``export_onnx`` (torch side, at build time): the eager model's ``forward`` traced into a graph
  with a free batch size, and checked against the eager model before it is kept;
* ``OnnxEncoder`` (query side): the same preprocessing as ``transforms.eval_transform`` written
  with OpenCV and NumPy (the same OpenCV calls albumentations makes, so the pixels are identical),
  then onnxruntime. It imports neither torch, timm, torchvision, albumentations nor pandas.

The vectors match the eager model's to float rounding (tests/test_onnx_encoder.py).
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

ENCODER_FILE = "encoder.onnx"
EXPORT_TOLERANCE = 1e-4  # max |difference| to the eager model's vectors for an export to be kept
_INPUT, _OUTPUT, _MAPS = "images", "vectors", "maps"


def export_onnx(model: Any, image_size: int, path: Path, maps: bool = False) -> bool:
    """Write ``model`` (an ``EmbeddingModel``) as ONNX to ``path``; False (and a warning) where
    the backbone does not export or the graph disagrees with the eager model. ``maps``: a second
    output, the local descriptors (``local_descriptors.VectorsAndMaps``)."""
    import copy

    import torch

    model = copy.deepcopy(model).eval().cpu()  # the caller's model stays where it is
    outputs = [_OUTPUT]
    if maps:
        from ..models.local_descriptors import VectorsAndMaps

        model, outputs = VectorsAndMaps(model).eval(), [_OUTPUT, _MAPS]
    example = torch.rand(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notes
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17,
                              input_names=[_INPUT], output_names=outputs,
                              dynamic_axes={name: {0: "batch"} for name in [_INPUT, *outputs]})
            expected = model(example)
            expected = [t.numpy() for t in expected] if maps else [expected.numpy()]
        got = _session(path).run(None, {_INPUT: example.numpy()})
    except Exception as err:  # exporters raise many types; the eager model still answers
        log.warning("could not export the model to ONNX (%s: %s): queries will load the full "
                    "model (slower start)", type(err).__name__, str(err).splitlines()[0][:200])
        path.unlink(missing_ok=True)
        return False
    difference = max(float(np.abs(g - e).max()) for g, e in zip(got, expected))
    if difference > EXPORT_TOLERANCE:
        log.warning("the ONNX export differs from the model by %.2g: not kept", difference)
        path.unlink(missing_ok=True)
        return False
    return True


def _session(path: Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    # no busy-waiting after a run: spinning threads slowed the gallery search that follows each
    # embedding from 21 to 48 ms (100k x 1280, 2 cores)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def preprocess(image: np.ndarray, preprocessing: dict[str, Any]) -> np.ndarray:
    """``eval_transform`` in OpenCV + NumPy: resize the longer side to ``image_size`` (aspect kept,
    sizes rounded as albumentations rounds them), pad to a square by replicating the border
    (centred), normalise; (3, S, S) float32."""
    import cv2

    size = int(preprocessing["image_size"])
    height, width = image.shape[:2]
    scale = size / max(height, width)
    if scale != 1.0:
        new_size = (max(1, int(round(width * scale))), max(1, int(round(height * scale))))
        image = cv2.resize(image, new_size, interpolation=_interpolation(preprocessing))
    height, width = image.shape[:2]
    top, left = (size - height) // 2 if height < size else 0, (size - width) // 2 if width < size else 0
    if height < size or width < size:
        image = cv2.copyMakeBorder(image, top, max(0, size - height - top), left,
                                   max(0, size - width - left), cv2.BORDER_REPLICATE)
    mean = np.asarray(preprocessing["mean"], dtype=np.float32) * 255.0
    std = np.asarray(preprocessing["std"], dtype=np.float32) * 255.0
    return ((image.astype(np.float32) - mean) / std).transpose(2, 0, 1)


def _interpolation(preprocessing: dict[str, Any]) -> int:
    import cv2

    return {"bicubic": cv2.INTER_CUBIC, "bilinear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST,
            "area": cv2.INTER_AREA}.get(preprocessing.get("interpolation", "bicubic"), cv2.INTER_CUBIC)


class OnnxEncoder:
    """The exported model with its preprocessing: ``encode`` as ``encoder.Encoder.encode`` does."""

    def __init__(self, path: Path, preprocessing: dict[str, Any], fingerprint: str, tta: str = "none"):
        self.session = _session(path)
        self.preprocessing = preprocessing
        self.fingerprint = fingerprint
        self.tta = tta
        # exported with the local descriptors as a second output (an index that re-scores)
        self.gives_maps = [o.name for o in self.session.get_outputs()] == [_OUTPUT, _MAPS]

    def encode(self, paths: Sequence[str | Path], batch_size: int = 64, num_workers: int = 0,
               device: Any = None, progress: bool = True, desc: str = "embedding",
               maps: bool = False):
        """(N, D) float32 unit vectors of the images at ``paths``, in batches (with ``maps``:
        and their (N, L, C) float16 local descriptors)."""
        from ..data import load_image
        from ..progress import bar

        chunks = [self.encode_arrays([load_image(p) for p in paths[start:start + batch_size]],
                                     maps=maps)
                  for start in bar(range(0, len(paths), batch_size), progress, desc=desc,
                                   unit="batch", leave=False)]
        if not chunks:
            return np.zeros((0, 0), dtype=np.float32)
        if not maps:
            return np.concatenate(chunks)
        return np.concatenate([v for v, _ in chunks]), np.concatenate([m for _, m in chunks])

    def encode_arrays(self, images: Sequence[np.ndarray], device: Any = None, maps: bool = False):
        if maps and not self.gives_maps:
            raise ValueError("this exported encoder has no local descriptors output")
        batch = np.stack([preprocess(image, self.preprocessing) for image in images])
        outputs = self.session.run(None, {_INPUT: batch})
        vectors = outputs[0]
        if self.tta == "flip":
            vectors = vectors + self.session.run(None, {_INPUT: np.ascontiguousarray(
                batch[..., ::-1])})[0]
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors.astype(np.float32)
        return (vectors, outputs[1].astype(np.float16)) if maps else vectors
