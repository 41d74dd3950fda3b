"""Reading requests: JSON bodies strictly parsed, size- and depth-limited; query strings without repeats."""

from __future__ import annotations

import json
import math
from typing import Any

from flask import current_app, request
from gunicorn.http.errors import ParseException as ServerParseError
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge

from jobs.refusals import ApiError

# Levels of objects and arrays a request body may nest (the body itself is level 1). Deeper
# values cannot be stored or serialized safely, and no job needs them.
MAX_JSON_DEPTH = 32
# Longest key quoted back in an error message.
_KEY_SHOWN = 100


def read_json_object() -> dict[str, Any]:
    """The request body as a JSON object, or an ApiError with the right 4xx status."""
    if not _is_json(request.mimetype):
        raise ApiError(
            415,
            "Send the body as JSON with 'Content-Type: application/json'.",
            details={"content_type": request.content_type},
        )
    raw = _read_body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "The body is not valid UTF-8.", code="invalid_json") from None
    try:
        value = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            object_pairs_hook=_unique_keys,
        )
    except _DuplicateKey as error:
        raise ApiError(
            400,
            f"The body has the key {error.key[:_KEY_SHOWN]!r} more than once in one object; "
            "send each key once.",
            code="invalid_json",
            details={"duplicate_key": error.key[:_KEY_SHOWN]},
        ) from None
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
    except RecursionError:  # far deeper than the limit: Python's parser gives up first
        raise _too_deep_error("") from None
    if not isinstance(value, dict):
        raise ApiError(
            422,
            "The body must be a JSON object.",
            details=[{"field": "", "message": f"expected an object, got {type(value).__name__}"}],
        )
    deep = _too_deep(value, MAX_JSON_DEPTH)
    if deep is not None:
        raise _too_deep_error(deep)
    return value


def query_args() -> dict[str, str]:
    """The query string as a mapping; a 422 when a parameter is given more than once."""
    repeated = [name for name, values in request.args.lists() if len(values) > 1]
    if repeated:
        raise ApiError(
            422,
            "The request has invalid fields.",
            details=[
                {"field": name[:_KEY_SHOWN], "message": "given more than once", "type": "repeated"}
                for name in repeated
            ],
        )
    return request.args.to_dict()


def _read_body() -> bytes:
    """The raw body, at most MAX_CONTENT_LENGTH bytes; a JSON 4xx when it cannot be read."""
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    try:
        # Flask refuses a Content-Length over MAX_CONTENT_LENGTH (413) and cuts a chunked
        # body at the limit; a chunked body with more to come is refused here.
        raw = request.get_data(cache=True)
        # The server terminates chunked input (wsgi.input_terminated), so the read cannot block.
        at_limit = request.content_length is None and limit is not None and len(raw) >= limit
        if at_limit and request.environ["wsgi.input"].read(1):
            raise RequestEntityTooLarge()
    except (ServerParseError, OSError, ClientDisconnected):
        # gunicorn raises these while reading a malformed chunked body (a bad chunk size, a
        # missing CRLF, a bad trailer) or one cut short (werkzeug turns an OSError into
        # ClientDisconnected): the request cannot be read.
        raise ApiError(
            400,
            "The request body could not be read: its chunked encoding is malformed or it ended early.",
        ) from None
    return raw


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads's object hook: an object, unless a key repeats (parsers disagree on which wins)."""
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return value


def _too_deep_error(field: str) -> ApiError:
    return ApiError(
        422,
        f"The body nests objects and arrays more than {MAX_JSON_DEPTH} levels deep; that is the limit.",
        details=[
            {"field": field, "message": f"nested more than {MAX_JSON_DEPTH} levels deep", "type": "too_deep"}
        ],
    )


def _too_deep(value: Any, limit: int) -> str | None:
    """The dotted path to a container nested deeper than `limit` levels, or None."""
    # Iterative, and each entry knows only its parent: a path is built only for the answer.
    stack: list[tuple[Any, int, tuple | None]] = [(value, 1, None)]
    while stack:
        item, depth, trail = stack.pop()
        if depth > limit:
            parts: list[str] = []
            while trail is not None:
                key, trail = trail
                parts.append(str(key)[:_KEY_SHOWN])
            return ".".join(reversed(parts))
        children = item.items() if isinstance(item, dict) else enumerate(item)
        for key, child in children:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1, (key, trail)))
    return None


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
