"""`siamkit serve`: a model behind an HTTP API (FastAPI + uvicorn), with galleries kept in a store.

app.py (routes) -> service.py (the model, the batcher, the store, the live indexes) -> batching.py, images.py,
index.py, store.py, keys.py. Nothing here imports fastapi at import time except app.py and command.py's server
start, so the store and the index are usable (and tested) without the serve extra.
"""
