"""The synchronous baseline of bench.embed: a Flask endpoint that encodes each request's text
on the spot, what one would write instead of a job queue.

    gunicorn -k gthread -w 4 --threads 4 'bench.sync_embed_app:create_app()'

Each process loads the model as Afterward's embedder does (`jobs.index.embedding.get_encoder`:
EMBED_BACKEND, EMBED_THREADS) and warms it before it serves. It stores nothing: the baseline
does the least work that answers the request with the vector made.
"""

from __future__ import annotations

from jobs.settings import apply_process_environment

apply_process_environment()  # thread pins and offline mode, before numpy or the model load

from flask import Flask, request  # noqa: E402

from jobs.index.embedding import get_encoder  # noqa: E402


def create_app() -> Flask:
    app = Flask(__name__)
    encoder = get_encoder()
    encoder.encode(["warm up the model before the first request"])

    @app.post("/embed")
    def embed() -> tuple[dict, int]:
        vector = encoder.encode([request.get_json()["text"]])[0]
        return {"status": "finished", "dimensions": len(vector)}, 200

    return app
