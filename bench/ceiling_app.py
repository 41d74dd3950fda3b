"""The HTTP ceiling of bench.e2e_log: the same POST + GET pairs answered with no queue at all.

POST /jobs/log answers 202 with an id and a Location; GET of that Location answers the job
`finished` at once. Nothing is stored or run: what is left is Flask, gunicorn and HTTP.
"""

from __future__ import annotations

import uuid

from flask import Flask, request


def create_app() -> Flask:
    app = Flask(__name__)

    @app.post("/jobs/log")
    def submit() -> tuple[dict, int, dict]:
        job_id = uuid.uuid4().hex
        body = request.get_json()
        return (
            {"id": job_id, "status": "queued", "message": body["message"]},
            202,
            {"Location": f"/jobs/{job_id}"},
        )

    @app.get("/jobs/<job_id>")
    def read(job_id: str) -> dict:
        return {"id": job_id, "status": "finished"}

    return app
