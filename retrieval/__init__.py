"""whale-id style image retrieval: learn an embedding, find who a photo shows or say "new_whale".

The public API, in the order a project uses it::

    from retrieval import BuildOptions, TrainConfig, build_index, read_gallery, run_query, train

    samples = read_gallery("train/", "train.csv")                 # or a folder per identity
    model_path = train(TrainConfig(out="runs/whales", image_size=96), samples)
    build_index(BuildOptions(out="runs/index", gallery="train/", labels="train.csv",
                             model=str(model_path)))
    for answer in run_query("test/", "runs/index", k=5).answers:
        print(answer.image, answer.labels)                      # new_whale placed by threshold

Lower level: ``create_model`` / ``load_model`` (a checkpoint back as a model), ``embed_images``,
``load_index`` (an index folder, searchable). Names load lazily, so ``import retrieval`` (and the
CLIs' ``--help``) stays free of torch.

Four parts, each importing only from those before it (``tests/test_layers.py`` checks):

* ``retrieval`` itself, what every side shares: ``config`` (the run config), ``data``
  (galleries, splits, the one image loader), ``metrics`` (MAP@5, top-k, macro-F1, ``new_whale``
  insertion), ``gallery_threshold`` (threshold, hubness weight and whitening calibrated by
  leave-one-out over a labelled gallery) and ``image_size`` (the size the untrained features
  prefer), which the zero-shot index and training both use, ``distributed`` (torchrun),
  ``errors`` / ``progress`` / ``files`` / ``cli``.
* ``retrieval.models``, the network and running it: ``model`` / ``pretrained`` (backbone -> GeM
  -> neck), ``checkpoint`` (read without running code), ``transforms``, ``identity_transforms``,
  ``embed`` (images -> unit vectors).
* ``retrieval.training``: ``recipe`` (optimiser groups, warm-up, schedule), ``losses``,
  ``train`` (select and refit stages), ``evaluate`` (validation MAP@5 and the threshold),
  ``protocol`` (the whale protocol).
* ``retrieval.answering``, everything after training, none of it importing the training side:
  ``encoder`` / ``onnx_encoder`` (the model behind an index and its ONNX export for the cold
  query path), ``indexing`` (build, append, remove), ``query`` / ``submission`` / ``report`` (answers, the Kaggle CSV and its scorer, the
  HTML page), ``service`` (model + index kept warm for serve.py), ``heatmap`` / ``audit`` (why
  two images matched; duplicates, mislabels, outliers).
"""
from __future__ import annotations

import importlib
from typing import Any

NEW_WHALE = "new_whale"

_EXPORTS = {
    "TrainConfig": ("config", "TrainConfig"),
    "read_gallery": ("data", "read_gallery"),
    "create_model": ("models.model", "create_model"),
    "load_model": ("models.checkpoint", "load_model"),
    "train": ("training.train", "train"),
    "embed_images": ("models.embed", "embed_images"),
    "BuildOptions": ("answering.indexing", "BuildOptions"),
    "build_index": ("answering.indexing", "run"),
    "run_query": ("answering.query", "run_query"),
}

__all__ = ["NEW_WHALE", *_EXPORTS, "load_index"]


def __getattr__(name: str) -> Any:
    if name == "load_index":
        from index.store import load_index

        return load_index
    if name in _EXPORTS:
        module, attribute = _EXPORTS[name]
        return getattr(importlib.import_module(f".{module}", __name__), attribute)
    raise AttributeError(f"module 'retrieval' has no attribute {name!r}")
