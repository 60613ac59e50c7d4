"""Serve a gallery index over HTTP: a page to drop photos into, and a JSON API.

  python serve.py --index runs/index                 # then open http://127.0.0.1:8000/
  python serve.py --index runs/index --host 0.0.0.0 --port 8080

The model, preprocessing and index load once. The page (/) ranks the identities for a dropped photo
and adds it to the gallery as "this is X" or as a new identity; the API is documented at /docs:
POST /query, POST /gallery, GET /identities, DELETE /identities/{id}, GET /images/{id}, GET /health.
Added photos are stored in the index folder (uploads/) and committed atomically before the answer.
"""
from __future__ import annotations

import argparse
import logging

from retrieval.cli import add_index_argument, add_model_argument
from retrieval.errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_index_argument(p)
    add_model_argument(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default %(default)s: this machine only; 0.0.0.0 "
                        "for every network interface, with no authentication)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default %(default)s)")
    p.add_argument("--no-batching", dest="batching", action="store_false",
                   help="embed each photo on its own instead of letting photos that arrive "
                        "together share one forward pass (dynamic batching, on by default)")
    p.add_argument("--device", choices=["cpu", "cuda"],
                   help="force a device for embedding (default: cuda when available)")
    return p


def main() -> int:
    args = build_parser().parse_args()
    import uvicorn

    from retrieval.answering.service import GalleryService
    from server.app import create_app

    service = GalleryService(args.index, model=args.model, device=args.device, batching=args.batching)
    logging.getLogger(__name__).info("serving %s on http://%s:%d/ (API docs at /docs)",
                                     args.index, args.host, args.port)
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    run_cli(main)
