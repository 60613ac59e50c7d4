"""The warm service and its HTTP API, in process (FastAPI's TestClient), on real ORL faces at
64 px: answers, edits that the next query sees and a restart keeps, one-line 4xx errors, uploads
that cannot land outside the index folder, and appends racing queries from threads."""
from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from index import load_index
from retrieval import NEW_WHALE
from retrieval.answering.service import UPLOADS_DIR, GalleryService

from .conftest import ORL, SERVICE_GALLERY
from .index_helpers import IMAGE_SIZE, single_threaded, writers_beside_a_reader

GALLERY = SERVICE_GALLERY


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from single_threaded()


@pytest.fixture
def client(index_dir):
    from server.app import create_app

    return TestClient(create_app(GalleryService(index_dir)))


def photo(identity: str, number: int) -> bytes:
    return (ORL / identity / f"{number}.pgm").read_bytes()


def post_query(client, data: bytes, k: int = 5):
    return client.post("/query", files={"image": ("q.pgm", data)}, data={"k": str(k)})


def post_add(client, data: bytes, identity: str, new: bool = False, name: str = "p.pgm"):
    return client.post("/gallery", files={"image": (name, data)},
                       data={"identity": identity, "new_identity": str(new).lower()})


def test_query_answers_the_identity_with_its_matching_gallery_thumbnails(client, service_built):
    gallery_photo = sorted((service_built / "gallery" / "s3").iterdir())[0]
    response = post_query(client, gallery_photo.read_bytes(), k=3)
    assert response.status_code == 200, response.text
    answer = response.json()
    first = answer["candidates"][0]
    # cosine 1 to itself, less the hubness correction where the gallery chose one
    stored = load_index(service_built / "index")
    penalty = stored.gallery.penalty
    correction = 0.0 if penalty is None else penalty[stored.paths.index(str(gallery_photo))]
    assert first["identity"] == "s3" and first["similarity"] == pytest.approx(1.0 - correction, abs=1e-4)
    assert len(first["images"]) == 3  # s3's three gallery photos, best first
    assert [i["similarity"] for i in first["images"]] == sorted(
        (i["similarity"] for i in first["images"]), reverse=True)
    for candidate in answer["candidates"]:  # an identity's score is its best image's, as shown
        if candidate["similarity"] is not None:
            assert candidate["images"][0]["similarity"] == pytest.approx(candidate["similarity"],
                                                                         abs=1e-4)
    assert len(answer["candidates"]) == 3 and answer["threshold"] is not None
    thumb = client.get(first["images"][0]["url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 192
    assert client.get("/health").json()["images"] == 18


def test_a_new_identity_is_answered_next_and_survives_a_restart(client, index_dir):
    stranger = photo("s30", 1)
    before = post_query(client, stranger).json()
    assert before["candidates"][0]["identity"] in {NEW_WHALE, *GALLERY}
    added = post_add(client, stranger, "newcomer", new=True)
    assert added.status_code == 200 and added.json()["added"] and added.json()["images"] == 19
    after = post_query(client, photo("s30", 1)).json()
    assert after["candidates"][0]["identity"] == "newcomer" and not after["probably_new"]
    assert post_add(client, stranger, "newcomer").json()["added"] is False  # no duplicate
    assert post_add(client, photo("s30", 2), "newcomer").json()["images"] == 20

    restarted = GalleryService(index_dir)  # what a new server process reads
    rows = restarted.current().rows_of["newcomer"]
    assert len(rows) == 2
    stored = load_index(index_dir)
    assert stored.manifest.counts == {"images": 20, "identities": 7}
    assert all(Path(p).parent == index_dir.resolve() / UPLOADS_DIR
               for p, i in zip(stored.paths, stored.identities) if i == "newcomer")
    assert restarted.query(stranger).candidates[0].identity == "newcomer"


def test_removing_an_identity_drops_its_images_and_uploaded_files(client, index_dir):
    post_add(client, photo("s31", 1), "visitor", new=True)
    uploads = list((index_dir / UPLOADS_DIR).iterdir())
    assert len(uploads) == 1
    response = client.delete("/identities/visitor")
    assert response.json() == {"identity": "visitor", "removed": 1}
    assert not uploads[0].exists()
    assert "visitor" not in {i["identity"] for i in client.get("/identities").json()}
    assert post_query(client, photo("s31", 1)).json()["candidates"][0]["identity"] != "visitor"


@pytest.mark.parametrize("request_, status, fragment", [
    (lambda c: post_query(c, b"not an image at all"), 400, "not a recognised image format"),
    (lambda c: post_query(c, b""), 400, "is empty"),
    (lambda c: post_query(c, photo("s1", 9), k=0), 422, "k: Input should be greater than"),
    (lambda c: post_add(c, photo("s1", 9), "nobody"), 404, "not in the gallery"),
    (lambda c: post_add(c, photo("s1", 9), "s2", new=True), 409, "already exists"),
    (lambda c: post_add(c, photo("s1", 9), "two words", new=True), 400, "contains whitespace"),
    (lambda c: post_add(c, photo("s1", 9), NEW_WHALE, new=True), 400, "cannot be an identity"),
    (lambda c: c.delete("/identities/nobody"), 404, "not in the gallery"),
    (lambda c: c.get("/images/0123456789abcdef0123"), 404, "no gallery image"),
])
def test_bad_input_answers_4xx_with_a_one_line_reason(client, request_, status, fragment):
    response = request_(client)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and fragment in detail


def test_an_upload_over_the_limit_is_refused_with_413(client, monkeypatch):
    import retrieval.answering.service
    import server.app

    monkeypatch.setattr(server.app, "MAX_UPLOAD_BYTES", 1000)
    monkeypatch.setattr(retrieval.answering.service, "MAX_UPLOAD_BYTES", 1000)
    response = post_query(client, photo("s1", 9))
    assert response.status_code == 413 and "limit" in response.json()["detail"]


def test_a_photo_cannot_be_relabelled_or_remove_the_last_identity(client, index_dir):
    post_add(client, photo("s32", 1), "first", new=True)
    again = post_add(client, photo("s32", 1), "second", new=True)
    assert again.status_code == 409 and "already in the gallery as 'first'" in again.json()["detail"]
    service = GalleryService(index_dir)
    for identity in GALLERY:
        service.remove_identity(identity)
    with pytest.raises(Exception, match="would leave the gallery empty"):
        service.remove_identity("first")


def test_nothing_a_client_sends_is_written_outside_the_index_folder(client, index_dir, tmp_path):
    before = {p for p in tmp_path.rglob("*")}
    for name in ("../../escape.pgm", "/etc/evil.pgm", "..\\x.pgm"):
        response = post_add(client, photo("s33", 1), "s1", name=name)
        assert response.status_code == 200
    lock = tmp_path / ".index.lock"  # the index's own writer lock, beside it (index.store)
    created = {p for p in tmp_path.rglob("*")} - before - {lock}
    assert created and all(index_dir in p.parents for p in created)
    uploads = list((index_dir / UPLOADS_DIR).iterdir())
    assert [p.suffix for p in uploads] == [".ppm"] and len(uploads[0].stem) == 40


def test_appends_from_two_threads_while_queries_run_lose_and_duplicate_nothing(index_dir):
    service = GalleryService(index_dir)
    errors: list[BaseException] = []
    answered = []

    def append(identity: str, numbers):
        try:
            service.add(photo(identity, numbers[0]), f"new_{identity}", new_identity=True)
            for n in numbers[1:]:
                service.add(photo(identity, n), f"new_{identity}")
                service.add(photo(identity, n), f"new_{identity}")  # a retry: no duplicate
        except BaseException as err:  # reported below
            errors.append(err)

    def ask(stop: threading.Event):
        while not stop.is_set():
            try:
                answered.append(service.query(photo("s2", 9), k=3).candidates[0].identity)
            except BaseException as err:
                errors.append(err)

    writers_beside_a_reader(ask, [lambda p=person: append(p, [1, 2, 3, 4]) for person in ("s20", "s21")])
    assert not errors, errors
    assert answered and set(answered) <= {"s2", NEW_WHALE, *GALLERY}
    stored = load_index(index_dir)
    assert stored.manifest.counts == {"images": 18 + 8, "identities": 6 + 2}
    assert len(set(stored.paths)) == len(stored.paths)
    assert stored.identities.count("new_s20") == stored.identities.count("new_s21") == 4
    np.testing.assert_allclose(np.linalg.norm(stored.vectors(), axis=1), 1.0, atol=1e-5)


def test_a_query_whose_snapshot_lost_its_files_to_an_append_is_answered_from_the_new_index(
        index_dir, monkeypatch):
    """The race CI once hit: a query takes the snapshot, another writer's append commits and
    deletes that snapshot's data folder, then the query reads its vectors (on first use)."""
    service, writer = GalleryService(index_dir), GalleryService(index_dir)
    taken = service.current()
    real_current, real_embed = service.current, service.embed
    steps: list[str] = []

    def embed_then_answer(image):
        embedded = real_embed(image)
        steps.append("embedded")
        return embedded

    def current_then_an_append_commits():
        if steps == ["embedded"]:  # the query takes its snapshot; then the writer commits
            writer.add(photo("s20", 1), "new_s20", new_identity=True)
            steps.append("appended")
            return taken  # its data folder gone now, its vectors never read
        return real_current()

    monkeypatch.setattr(service, "embed", embed_then_answer)
    monkeypatch.setattr(service, "current", current_then_an_append_commits)
    answer = service.query(photo("s20", 2), k=3)
    assert steps == ["embedded", "appended"]
    assert not (index_dir / taken.stored.manifest.data_dir).exists()
    assert answer.candidates[0].identity == "new_s20"  # answered from the appended index
    assert answer.candidates[0].images[0].similarity == pytest.approx(answer.candidates[0].similarity,
                                                                      abs=1e-4)


def test_query_py_reads_the_new_index_when_an_append_replaced_it_while_photos_were_checked(
        index_dir, monkeypatch):
    """run_query loads the index, checks the query photos, then opens the encoder file: an append
    in between deletes the old files, which must not read as "encoder.onnx is missing"."""
    from retrieval.answering import query

    assert load_index(index_dir).attachment("encoder.onnx") is not None
    checked = query._readable_queries

    def check_while_an_append_commits(*args, **kwargs):
        GalleryService(index_dir).add(photo("s20", 1), "new_s20", new_identity=True)
        return checked(*args, **kwargs)

    monkeypatch.setattr(query, "_readable_queries", check_while_an_append_commits)
    result = query.run_query(ORL / "s20" / "2.pgm", index_dir, k=3, progress=False)
    assert result.answers[0].hits[0].identity == "new_s20"


def test_photos_arriving_together_share_a_forward_pass_and_get_their_own_vectors(index_dir):
    from concurrent.futures import ThreadPoolExecutor

    from retrieval.answering.service import decode_upload

    service = GalleryService(index_dir)
    sizes = []
    encode = service._encode_many

    def recording(images):
        sizes.append(len(images))
        return encode(images)

    service._batcher._encode = recording
    images = [decode_upload(photo(f"s{p}", 1)) for p in range(10, 22)]
    alone = np.concatenate([service.encoder.encode_arrays([image]) for image in images])
    with ThreadPoolExecutor(max_workers=12) as pool:
        embedded = list(pool.map(service.embed, images))
    np.testing.assert_allclose(np.concatenate([vector for vector, _ in embedded]), alone, atol=1e-5)
    assert sum(sizes) == 12 and max(sizes) > 1
    if service.current().stored.local is not None:  # and each photo's own local descriptors
        maps = np.concatenate([service.encoder.encode_arrays([image], maps=True)[1]
                               for image in images])
        np.testing.assert_allclose(np.concatenate([m for _, m in embedded]).astype(np.float32),
                                   maps.astype(np.float32), atol=2e-2)


def test_explain_returns_both_heat_maps_for_a_match(client):
    from .test_heatmap import decode_data_uri

    data = photo("s3", 9)
    match = post_query(client, data).json()["candidates"][0]
    response = client.post("/explain", files={"image": ("q.pgm", data)},
                           data={"gallery_image": match["images"][0]["id"]})
    assert response.status_code == 200, response.text
    maps = response.json()
    for key in ("query", "gallery"):
        assert decode_data_uri(maps[key]).size == (IMAGE_SIZE, IMAGE_SIZE)
    missing = client.post("/explain", files={"image": ("q.pgm", data)},
                          data={"gallery_image": "0" * 20})
    assert missing.status_code == 404


def test_a_photo_added_to_a_whitened_index_goes_through_its_map(client, index_dir):
    """The served zero-shot index chose within-identity whitening on its gallery (the premise);
    a photo added through the service is stored in the whitened space its queries are asked
    in: asked again, it finds itself at cosine 1 (less its hubness correction)."""
    before = load_index(index_dir)
    assert before.whitening is not None
    response = post_add(client, photo("s3", 9), "s3", name="s3_9.pgm")
    assert response.status_code == 200, response.text
    after = load_index(index_dir)
    np.testing.assert_array_equal(after.whitening[1], before.whitening[1])
    added = next(i for i, path in enumerate(after.paths) if path not in before.paths)
    first = post_query(client, photo("s3", 9), k=1).json()["candidates"][0]
    penalty = after.gallery.penalty
    correction = 0.0 if penalty is None else penalty[added]
    assert first["identity"] == "s3" and first["similarity"] == pytest.approx(1.0 - correction, abs=1e-4)
