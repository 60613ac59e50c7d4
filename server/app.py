"""The HTTP face of ``retrieval.answering.service.GalleryService``: a JSON API (OpenAPI docs at /docs) and
the page at /. Routes only translate HTTP to service calls and service errors to status codes;
every decision lives in the service.

Endpoints run as plain functions in the server's thread pool, so a slow append never stops a
query from being answered.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response

from index.errors import GalleryIndexError
from retrieval.errors import UserError, as_user_error
from retrieval.answering.report import jpeg_thumbnail
from retrieval.answering.service import (MAX_UPLOAD_BYTES, Conflict, GalleryService, NotFound, TooLarge,
                               answer_json)

PAGE = Path(__file__).with_name("page.html")
STATUS = {NotFound: 404, Conflict: 409, TooLarge: 413}


def create_app(service: GalleryService) -> FastAPI:
    app = FastAPI(title="whale-id retrieval", version="1",
                  description="Who is in this photo? Ranked identities from a gallery index, "
                              "`new_whale` under the calibrated threshold, and a gallery that "
                              "learns new photos without a rebuild.")

    @app.exception_handler(UserError)
    def user_error(request: Request, err: UserError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=STATUS.get(type(err), 400))

    @app.exception_handler(RequestValidationError)
    def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"] if part != "body")
        return JSONResponse({"detail": f"{where}: {first['msg']}"}, status_code=422)

    @app.exception_handler(GalleryIndexError)
    def index_error(request: Request, err: GalleryIndexError) -> JSONResponse:
        return JSONResponse({"detail": str(as_user_error(err))}, status_code=503)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text())

    @app.get("/health", summary="Is the service up, and what index does it serve")
    def health() -> dict:
        return service.health()

    @app.post("/query", summary="Rank the gallery's identities for one photo")
    def query(request: Request, image: Annotated[UploadFile, File(description="the photo")],
              k: Annotated[int, Form(ge=1, le=100, description="identities per answer, "
                                                                "new_whale included")] = 5) -> dict:
        answer = service.query(_read(image), k, name=_name(image))
        return answer_json(answer, lambda image_id: str(request.url_for("image", image_id=image_id)))

    @app.post("/gallery", summary="Add a photo to the gallery as an existing or a new identity")
    def add(image: Annotated[UploadFile, File(description="the photo")],
            identity: Annotated[str, Form(description="the identity it shows")],
            new_identity: Annotated[bool, Form(description="create the identity (it must not "
                                                           "exist yet)")] = False) -> dict:
        added = service.add(_read(image), identity, new_identity, name=_name(image))
        return {"identity": added.identity, "image": added.image.id, "added": added.added,
                "images": added.images}

    @app.post("/explain", summary="Heat-maps: where a photo and a gallery image found each other")
    def explain(image: Annotated[UploadFile, File(description="the photo")],
                gallery_image: Annotated[str, Form(description="a gallery image id from /query")]
                ) -> dict:
        query_png, gallery_png = service.explain(_read(image), gallery_image, name=_name(image))
        return {"query": _data_uri(query_png), "gallery": _data_uri(gallery_png)}

    @app.get("/identities", summary="Every identity with its gallery image ids")
    def identities() -> list[dict]:
        return service.identities()

    @app.delete("/identities/{identity:path}", summary="Remove an identity and all its images")
    def remove(identity: str) -> dict:
        return {"identity": identity, "removed": service.remove_identity(identity)}

    @app.get("/images/{image_id}", name="image", summary="A gallery image as a JPEG thumbnail",
             response_class=Response)
    def image(image_id: str, size: Annotated[int, Query(ge=16, le=1024)] = 192) -> Response:
        data = jpeg_thumbnail(service.image_path(image_id), size)
        return Response(data, media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600"})

    return app


def _read(upload: UploadFile) -> bytes:
    """The upload's bytes, refusing one over the limit without reading all of it into memory."""
    data = upload.file.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise TooLarge(f"{_name(upload)} is over the {MAX_UPLOAD_BYTES // 2**20} MB limit: downscale it")
    return data


def _data_uri(png: bytes) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _name(upload: UploadFile) -> str:
    """The client's file name, for messages only (never for a path): printable, bounded."""
    name = "".join(c for c in (upload.filename or "upload") if c.isprintable())[:80]
    return name or "upload"
