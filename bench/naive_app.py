"""The naive baseline of bench.enqueue: a minimal Flask endpoint around `queue.enqueue`."""

from __future__ import annotations

import os

from flask import Flask, request
from redis import Redis
from rq import Queue


def create_app() -> Flask:
    app = Flask(__name__)
    queue = Queue("default", connection=Redis.from_url(os.environ["REDIS_URL"]))

    @app.post("/jobs/log")
    def enqueue() -> tuple[dict, int]:
        job = queue.enqueue("jobs.types.log.write_log", message=request.get_json()["message"])
        return {"id": job.id, "status": "queued"}, 202

    return app
