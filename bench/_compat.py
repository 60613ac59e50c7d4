"""A guarded work-around for one known incompatibility, applied only when it is detected.

``import pytorch_metric_learning.samplers`` (which ``retrieval.train`` does) imports
``faiss.contrib.torch_utils``; that module replaces ``faiss.Index.search`` on every index class by
a torch-aware wrapper whose signature is ``search(x, k, D=None, I=None, numeric_type=...)``: no
``params`` keyword. ``index/search.py`` (working tree) calls ``search(queries, n, params=...)``, so
in any process that imported the trainer, ``GalleryIndex.search`` raises ``TypeError``. (Reported to
the project; not fixed here, since bench/ must not change the engine.)

``apply_if_needed`` probes for exactly that failure and, only then, wraps the replacement so a
NumPy call with ``params`` goes to FAISS's original NumPy method (``search_numpy``), which takes
it. Torch-tensor calls (pytorch-metric-learning's own k-NN) keep going to the torch wrapper. The
JSON of every suite records whether it was applied.
"""
from __future__ import annotations

import inspect

APPLIED: dict = {"applied": False, "reason": None}


def _probe() -> str | None:
    import numpy as np

    import retrieval.train  # noqa: F401  (the import that patches faiss)
    from index import GalleryIndex

    vectors = np.eye(4, dtype=np.float32)
    try:
        GalleryIndex(vectors, ["a", "b", "c", "d"]).search(vectors[:1], 2)
    except TypeError as err:
        if "params" in str(err):
            return f"TypeError: {err}"
        raise
    return None


def apply_if_needed() -> dict:
    if APPLIED["applied"]:
        return APPLIED
    reason = _probe()
    if reason is None:
        return APPLIED
    import faiss
    import numpy as np

    for name in dir(faiss):
        cls = getattr(faiss, name)
        if not (inspect.isclass(cls) and issubclass(cls, faiss.Index)):
            continue
        if not hasattr(cls, "search_numpy") or getattr(cls.search, "_bench_compat", False):
            continue
        torch_search = cls.search

        def search(self, x, k, *args, params=None, _torch_search=torch_search, **kwargs):
            if isinstance(x, np.ndarray):
                return self.search_numpy(x, k, *args, params=params, **kwargs)
            return _torch_search(self, x, k, *args, **kwargs)

        search._bench_compat = True
        cls.search = search
    APPLIED.update(applied=True, reason=reason + " (GalleryIndex.search after faiss.contrib."
                   "torch_utils was imported by pytorch_metric_learning); bench wrapped "
                   "faiss Index.search so NumPy calls with params= reach FAISS's own search")
    if _probe() is not None:
        raise RuntimeError("the faiss compatibility shim did not take")
    return APPLIED
