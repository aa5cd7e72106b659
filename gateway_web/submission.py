"""Turning a submit request into a validated job input, by the service kind's schema and content type."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import request
from werkzeug.exceptions import BadRequest

from gateway_core.audio import measure_seconds
from gateway_core.catalog import ServiceKind, TranscribeOptions
from gateway_core.errors import (
    InvalidRequestError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
    ValidationFailedError,
)

JSON = "application/json"
MULTIPART = "multipart/form-data"


@dataclass
class Submission:
    request: dict[str, Any]
    audio: bytes | None = None
    audio_content_type: str | None = None
    audio_seconds: float | None = None
    audio_url: str | None = None


def accepted_types(kind: ServiceKind) -> list[str]:
    return [JSON, MULTIPART] if kind.takes_audio else [JSON]


def parse_submission(kind: ServiceKind, max_bytes: int) -> Submission:
    """Validate the body against the kind's schema; 413, 415, 400 or 422 before any job exists."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise PayloadTooLargeError(f"request body is larger than {max_bytes} bytes", details={"limit": max_bytes})
    types = accepted_types(kind)
    if request.mimetype not in types:
        raise UnsupportedMediaTypeError(
            f"Content-Type {request.mimetype or '(none)'!r} is not accepted here",
            details={"accepted": types},
        )
    if request.mimetype == MULTIPART:
        return _parse_upload()
    try:
        data = request.get_json()
    except BadRequest:
        raise InvalidRequestError("the body is not valid JSON", code="INVALID_JSON") from None
    if not isinstance(data, dict):
        raise _invalid([{"field": "(body)", "message": "the body must be a JSON object", "type": "dict_type"}])
    model = kind.json_model.model_validate(data)
    body = model.model_dump(mode="json", exclude_none=True)
    return Submission(request=body, audio_url=body.get("audio_url"))


def _parse_upload() -> Submission:
    upload = request.files.get("file")
    options = TranscribeOptions.model_validate(dict(request.form.items()))
    if upload is None:
        raise _invalid([{"field": "file", "message": "an audio file part named 'file' is required", "type": "missing"}])
    data = upload.read()
    seconds = measure_seconds(data)
    body = options.model_dump(mode="json", exclude_none=True)
    body["filename"] = upload.filename or "audio"
    return Submission(request=body, audio=data, audio_content_type=upload.mimetype or None, audio_seconds=seconds)


def _invalid(fields: list[dict[str, str]]) -> ValidationFailedError:
    return ValidationFailedError("the request is not valid", details={"fields": fields})
