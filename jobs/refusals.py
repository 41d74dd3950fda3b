"""The API's refusals: `ApiError`, an error answer with its HTTP status and code, and the
validation of a request body that raises one. Below the web layer, so that whatever builds
a job as the API does (jobs.submission: the API's views and the schedule ticker alike)
refuses it the same way; service.errors renders them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

# The error code of each status, when the refusal names none.
CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    411: "length_required",
    413: "payload_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    422: "validation_failed",
    429: "too_many_requests",
    431: "headers_too_large",
    500: "internal_error",
    503: "unavailable",
}


class ApiError(Exception):
    """An error answer; raise it from a view (or `abort`) and service.errors renders it."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or CODES.get(status, "error")
        self.details = details
        self.headers = headers or {}


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
