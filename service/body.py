"""Reading request bodies: JSON only, strictly parsed, size-limited."""

from __future__ import annotations

import json
import math
from typing import Any

from flask import current_app, request
from pydantic import BaseModel, ValidationError
from werkzeug.exceptions import RequestEntityTooLarge

from service.errors import ApiError


def read_json_object() -> dict[str, Any]:
    """The request body as a JSON object, or an ApiError with the right 4xx status."""
    if not _is_json(request.mimetype):
        raise ApiError(
            415,
            "Send the body as JSON with 'Content-Type: application/json'.",
            details={"content_type": request.content_type},
        )
    # Flask refuses a Content-Length over MAX_CONTENT_LENGTH (413) and cuts a chunked
    # body at the limit; a chunked body with more to come is refused here.
    raw = request.get_data(cache=True)
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    # The server terminates chunked input (wsgi.input_terminated), so the read cannot block.
    at_limit = request.content_length is None and limit is not None and len(raw) >= limit
    if at_limit and request.environ["wsgi.input"].read(1):
        raise RequestEntityTooLarge()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "The body is not valid UTF-8.", code="invalid_json") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as error:
        raise ApiError(
            400,
            f"The body is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}.",
            code="invalid_json",
        ) from None
    except _NonFinite as error:
        raise ApiError(400, str(error), code="invalid_json") from None
    except ValueError:  # e.g. an integer literal with thousands of digits
        raise ApiError(
            400, "The body is not valid JSON: a number is out of range.", code="invalid_json"
        ) from None
    except RecursionError:
        raise ApiError(
            400, "The body is not valid JSON: it is nested too deeply.", code="invalid_json"
        ) from None
    if not isinstance(value, dict):
        raise ApiError(
            422,
            "The body must be a JSON object.",
            details=[{"field": "", "message": f"expected an object, got {type(value).__name__}"}],
        )
    return value


def validate(model: type[BaseModel], data: Any, context: dict | None = None) -> BaseModel:
    """Validate `data` against `model`; a 422 listing every bad field otherwise."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as error:
        raise ApiError(422, "The request has invalid fields.", details=field_errors(error)) from None


def field_errors(error: ValidationError) -> list[dict[str, str]]:
    return [
        {
            "field": ".".join(str(part) for part in item["loc"]),
            "message": item["msg"],
            "type": item["type"],
        }
        for item in error.errors(include_url=False, include_input=False)
    ]


class _NonFinite(ValueError):
    pass


def _reject_constant(name: str) -> float:
    raise _NonFinite(f"The body is not valid JSON: {name} is not a JSON number.")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NonFinite(f"The body is not valid JSON: the number {text[:40]} is out of range.")
    return value


def _is_json(mimetype: str) -> bool:
    return mimetype == "application/json" or (
        mimetype.startswith("application/") and mimetype.endswith("+json")
    )
