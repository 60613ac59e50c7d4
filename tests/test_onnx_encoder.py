"""The exported encoder and the cold query path: OpenCV/NumPy preprocessing equal to the
albumentations pipeline, ONNX vectors equal to the eager model's on real images, and a query.py
that answers like the full model without importing torch, timm, albumentations or pandas."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from index import load_index
from index.errors import IndexCorrupt
from retrieval.answering.onnx_encoder import ENCODER_FILE, OnnxEncoder, preprocess
from retrieval.answering.query import _full_encoder, encoder_for, run_query
from retrieval.data import load_image
from retrieval.models.model import Preprocessing
from retrieval.models.transforms import eval_transform

from .conftest import ORL, SHARED_DATA
from .index_helpers import (
    IMAGE_SIZE,
    ROOT,
    copy_gallery,
    make_checkpoint,
    single_threaded,
)

HEAVY = ("torch", "timm", "torchvision", "albumentations", "pandas", "pytorch_metric_learning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from single_threaded()


def real_images():
    """Photos of every shape the shared data has: grey faces, colour dogs and groceries, crops."""
    paths = sorted((SHARED_DATA / "grocery").rglob("*.jpg"))[:6] + \
        sorted((SHARED_DATA / "dogfacenet").rglob("*.jpg"))[:4] + sorted(ORL.rglob("*.pgm"))[:3]
    images = [load_image(p) for p in paths]
    return images + [image[: image.shape[0] // 2, : image.shape[1] // 3 * 2] for image in images]


@pytest.mark.parametrize("size", [64, 97, 224])
def test_preprocessing_equals_the_albumentations_pipeline(size):
    pre = Preprocessing(image_size=size, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    transform = eval_transform(pre)
    for image in real_images():
        expected = transform(image=image)["image"].numpy()
        got = preprocess(image, vars(pre))
        assert got.shape == expected.shape == (3, size, size)
        np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.fixture(scope="module")
def indexes(tmp_path_factory, orl_samples):
    """A checkpoint index (with flip TTA), two of checkpoints that blend in the whitened
    untrained features (half the similarity; all of it, where the trained backbone is skipped),
    and a zero-shot one, all built as users build them."""
    from retrieval.answering.indexing import BuildOptions, run

    root = tmp_path_factory.mktemp("onnx")
    gallery = copy_gallery(orl_samples, root / "gallery", ["s1", "s2", "s3", "s4"], per_identity=2)
    ckpt = make_checkpoint(root / "model.pt", seed=0, threshold=0.5)
    common = dict(gallery=str(gallery), workers=0, batch_size=16, progress=False)
    run(BuildOptions(out=str(root / "trained"), model=str(ckpt), tta="flip", **common))
    for name, share in (("blended", 0.5), ("untrained_half_only", 1.0)):
        blended = make_checkpoint(root / f"{name}.pt", seed=1, threshold=0.5, pretrained_share=share)
        run(BuildOptions(out=str(root / name), model=str(blended), **common))
    run(BuildOptions(out=str(root / "zero"), image_size=IMAGE_SIZE, **common))
    return root


@pytest.mark.parametrize("name", ["trained", "blended", "untrained_half_only", "zero"])
def test_the_exported_encoder_gives_the_eager_models_vectors(indexes, name):
    stored = load_index(indexes / name)
    assert ENCODER_FILE in stored.manifest.files
    fast, full = encoder_for(stored), _full_encoder(stored.manifest, None)
    assert isinstance(fast, OnnxEncoder) and not isinstance(full, OnnxEncoder)
    queries = sorted(ORL.joinpath("s5").glob("*.pgm"))[:3] + sorted(ORL.joinpath("s1").glob("*.pgm"))[:2]
    got = fast.encode(queries, batch_size=2, progress=False)
    expected = full.encode(queries, batch_size=2, progress=False)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-4


def test_cold_query_imports_no_heavy_library_and_answers_like_the_full_model(indexes):
    script = (
        "import runpy, sys, json\n"
        "sys.argv = ['query.py', sys.argv[1], '--index', sys.argv[2], '--json']\n"
        "try:\n    runpy.run_path('query.py', run_name='__main__')\n"
        "except SystemExit as end:\n    code = end.code\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]), file=sys.stderr)\n"
        "sys.exit(code)\n")
    query = sorted(ORL.joinpath("s2").glob("*.pgm"))[-1]
    result = subprocess.run([sys.executable, "-c", script, str(query), str(indexes / "trained")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stderr.strip().splitlines()[-1]) == []
    cold = json.loads(result.stdout)["results"][0]["answers"]
    full = run_query(query, indexes / "trained", model=str(indexes / "model.pt"), progress=False)
    assert [a["identity"] for a in cold] == full.answers[0].labels
    for answer, hit in zip(cold, full.answers[0].hits):
        if hit.similarity is not None:
            assert answer["similarity"] == pytest.approx(hit.similarity, abs=1e-4)


def test_edits_carry_the_encoder_and_a_damaged_one_is_refused(indexes, tmp_path, orl_samples):
    import shutil

    from retrieval.answering.indexing import BuildOptions, run

    shutil.copytree(indexes / "zero", tmp_path / "idx")
    before = load_index(tmp_path / "idx").manifest.files[ENCODER_FILE]
    more = copy_gallery(orl_samples, tmp_path / "more", ["s9"], per_identity=2)
    run(BuildOptions(out=str(tmp_path / "idx"), gallery=str(more), append=True, workers=0,
                     progress=False))
    run(BuildOptions(out=str(tmp_path / "idx"), remove=["s1"], progress=False))
    stored = load_index(tmp_path / "idx")
    assert stored.manifest.files[ENCODER_FILE] == before and stored.manifest.counts["images"] == 8
    encoder_file = stored.attachment(ENCODER_FILE)
    encoder_file.write_bytes(encoder_file.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(IndexCorrupt, match="encoder.onnx is corrupt"):
        run_query(sorted(ORL.joinpath("s2").glob("*.pgm"))[0], tmp_path / "idx", progress=False)
