"""The web service: ``app.create_app`` wraps a ``retrieval.answering.service.GalleryService`` in a FastAPI
app (JSON API + the page at /); serve.py runs it with uvicorn."""
