"""Turning a submit request into a validated job input, by the service kind's schema and content type."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import current_app, request
from werkzeug.exceptions import RequestEntityTooLarge

from gateway_core.audio import content_type, measure_seconds
from gateway_core.catalog import ServiceKind, TranscribeOptions
from gateway_core.errors import (
    InvalidRequestError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
    ValidationFailedError,
)
from gateway_core.models import CONTENT_TYPE_LENGTH
from gateway_web.input_guard import check_form_text

JSON = "application/json"
MAX_FILENAME = 255
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
    data = parse_json(read_body(max_bytes))
    if not isinstance(data, dict):
        raise _invalid([{"field": "(body)", "message": "the body must be a JSON object", "type": "dict_type"}])
    model = kind.json_model.model_validate(data)
    body = model.model_dump(mode="json", exclude_none=True)
    return Submission(request=body, audio_url=body.get("audio_url"))


def _parse_upload() -> Submission:
    upload = request.files.get("file")
    for name, value in request.form.items(multi=True):
        check_form_text(f"form field {name}", name + value)
    options = TranscribeOptions.model_validate(dict(request.form.items()))
    if upload is None:
        raise _invalid([{"field": "file", "message": "an audio file part named 'file' is required", "type": "missing"}])
    filename = upload.filename or "audio"
    check_form_text("file name", filename)
    if len(filename) > MAX_FILENAME:
        raise _invalid(
            [{"field": "file", "message": f"the file name is over {MAX_FILENAME} characters", "type": "too_long"}]
        )
    media = content_type(upload.mimetype) if upload.mimetype else None
    if upload.mimetype and media is None:
        message = f"the file's Content-Type must be a printable media type of at most {CONTENT_TYPE_LENGTH} characters"
        raise _invalid([{"field": "file", "message": message, "type": "content_type"}])
    data = upload.read()
    seconds = measure_seconds(data)
    body = options.model_dump(mode="json", exclude_none=True)
    body["filename"] = filename
    return Submission(request=body, audio=data, audio_content_type=media, audio_seconds=seconds)


def read_body(max_bytes: int) -> bytes:
    """The whole body, or 413 past ``max_bytes``: a chunked body too, which has no Content-Length to check
    first (the request stream raises once a read goes past the limit)."""
    too_large = PayloadTooLargeError(f"request body is larger than {max_bytes} bytes", details={"limit": max_bytes})
    chunks: list[bytes] = []
    size = 0
    try:
        while chunk := request.stream.read(64 * 1024):
            size += len(chunk)
            if size > max_bytes:
                raise too_large
            chunks.append(chunk)
    except RequestEntityTooLarge:
        raise too_large from None
    return b"".join(chunks)


def parse_json(data: bytes) -> Any:
    """The body parsed by the app's bounded JSON provider; 400 INVALID_JSON saying why not."""
    try:
        return current_app.json.loads(data)
    except ValueError as exc:  # UnicodeDecodeError and the provider's bounds are ValueErrors too
        raise InvalidRequestError(
            "the body is not valid JSON", code="INVALID_JSON", details={"reason": str(exc)}
        ) from None


def _invalid(fields: list[dict[str, str]]) -> ValidationFailedError:
    return ValidationFailedError("the request is not valid", details={"fields": fields})
