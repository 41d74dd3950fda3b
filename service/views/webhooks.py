"""Completion webhooks, the key's side: the secret its deliveries are signed with."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from jobs.callbacks import key_secret
from service.errors import ApiError
from service.security import current_owner
from service.state import get_state

bp = Blueprint("webhooks", __name__)


@bp.get("/webhooks/secret")
def webhook_secret() -> Response:
    """The secret that signs the deliveries of this key's jobs (jobs.callbacks.key_secret)."""
    settings = get_state().settings
    if not settings.callback_secret:
        raise ApiError(
            404,
            "This server sends no completion webhooks: CALLBACK_SECRET is not set, so there is no "
            "signing secret. Poll jobs instead, or ask the operator to set it.",
            code="callbacks_disabled",
        )
    owner = current_owner()
    response = jsonify(owner=owner, secret=key_secret(settings.callback_secret, owner))
    response.headers["Cache-Control"] = "no-store"
    return response
