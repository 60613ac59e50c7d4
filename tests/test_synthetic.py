"""The realistic gallery generator (index.synthetic): fitted to embeddings with structure, its
samples keep their within / between identity similarities and their spectrum, at any size, in
chunks, into a memory-mapped file."""
from __future__ import annotations

import numpy as np

from index.synthetic import fit_gallery_model, sample_gallery, similarity_profile


def anisotropic_gallery(n_identities=1500, dim=64, seed=0):
    """Identity centres on a few strong directions around a common mean (as real embeddings
    are: all GeM features share a direction), images spread anisotropically around them."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=dim) * 0.6
    directions = np.linalg.qr(rng.normal(size=(dim, dim)))[0].T
    strengths = 1.0 / (1 + np.arange(dim)) ** 0.8
    centres = mean + (rng.normal(size=(n_identities, dim)) * strengths) @ directions
    counts = rng.integers(1, 5, size=n_identities)
    labels = np.repeat(np.arange(n_identities), counts)
    images = centres[labels] + 0.15 * (rng.normal(size=(len(labels), dim)) * strengths[::-1]) @ directions
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    return images.astype(np.float32), labels.astype(str)


def top_spectrum(vectors, n=8):
    centred = vectors - vectors.mean(axis=0)
    return np.linalg.svd(centred, compute_uv=False)[:n] ** 2 / len(vectors)


def test_samples_keep_the_similarities_and_the_spectrum_of_what_was_fitted():
    real, labels = anisotropic_gallery()
    model = fit_gallery_model(real, labels, rank=32)
    fake, fake_labels, queries, truth = sample_gallery(model, 20_000, 200, seed=1, chunk=997)
    assert fake.shape == (20_000, 64) and fake.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(fake, axis=1), 1, atol=1e-5)
    real_profile, fake_profile = similarity_profile(real, labels), similarity_profile(fake, fake_labels)
    assert real_profile["between"] > 0.2  # not isotropic: the case the generator is for
    for key in ("within", "between"):
        assert abs(real_profile[key] - fake_profile[key]) < 0.05, (key, real_profile, fake_profile)
    np.testing.assert_allclose(top_spectrum(fake), top_spectrum(real), rtol=0.25)
    # each query is a fresh image of a gallery identity: nearer its own images than the rest
    own = [fake[fake_labels == t] @ q for q, t in zip(queries[:50], truth[:50])]
    others = fake[:2000] @ queries[:50].T
    assert np.mean([o.max() for o in own]) > np.percentile(others, 99)
    assert set(truth) <= set(fake_labels)


def test_generation_in_chunks_into_a_memory_mapped_file(tmp_path):
    real, labels = anisotropic_gallery(300, 32)
    model = fit_gallery_model(real, labels, rank=8)
    target = np.lib.format.open_memmap(tmp_path / "g.npy", mode="w+", dtype=np.float32,
                                       shape=(5003, 32))
    gallery, names, queries, truth = sample_gallery(model, 5003, 40, chunk=64, out=target)
    assert gallery is target and len(names) == 5003
    target.flush()
    stored = np.load(tmp_path / "g.npy", mmap_mode="r")
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1, atol=1e-5)
    # identities come in contiguous runs with the observed image counts
    _, first, counts = np.unique(names, return_index=True, return_counts=True)
    assert counts.max() <= labels_max(labels) and (np.diff(np.sort(first)) > 0).all()
    assert queries.shape == (40, 32) and len(set(truth)) == 40


def labels_max(labels):
    return np.unique(labels, return_counts=True)[1].max()
