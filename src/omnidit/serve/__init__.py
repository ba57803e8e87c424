"""Serving: ``omnidit serve`` runs an OpenAI-compatible HTTP API with dynamic batching and a web page.

``app.build_app`` is the ASGI app (FastAPI), ``batching.Batcher`` the queue and worker thread that draws
every output, ``command`` the command line. Needs the ``serve`` extra (FastAPI, uvicorn, prometheus_client).
"""
