"""The one place raw request input is bounded before any view sees it: JSON nesting depth, and characters
PostgreSQL cannot store or that have no business in a path, a query or a form field (NUL and the other C0
controls). Each refusal is a 400 in the error envelope."""

from __future__ import annotations

import json
import re
from typing import Any

from flask import Flask, request
from flask.json.provider import DefaultJSONProvider

from gateway_core.errors import InvalidRequestError

MAX_JSON_DEPTH = 32
# C0 controls but tab, newline and carriage return (which text fields such as a prompt may carry).
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class BoundedJSONError(ValueError):
    """A JSON document nested too deeply, or holding a NUL character in a string."""


def check_json_value(value: Any) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH and NUL in any string or key (walked without recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                raise BoundedJSONError("JSON strings may not contain the NUL character (\\u0000)")
        elif isinstance(item, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise BoundedJSONError(f"JSON is nested deeper than {MAX_JSON_DEPTH} levels")
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


class BoundedJSONProvider(DefaultJSONProvider):
    """Flask's JSON, refusing what ``check_json_value`` refuses; Flask answers a ValueError from ``loads`` with
    400 (``request.get_json``), which the views turn into INVALID_JSON. Keys keep their order."""

    sort_keys = False

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        try:
            value = json.loads(s, **kwargs)
        except RecursionError:  # deeper than the parser itself can go
            raise BoundedJSONError(f"JSON is nested deeper than {MAX_JSON_DEPTH} levels") from None
        check_json_value(value)
        return value


def _refuse_controls(where: str, value: str) -> None:
    if CONTROL.search(value):
        raise InvalidRequestError(
            f"the {where} holds a control character", code="INVALID_CHARACTERS", details={"where": where}
        )


def init_input_guard(app: Flask) -> None:
    app.json_provider_class = BoundedJSONProvider
    app.json = BoundedJSONProvider(app)

    @app.before_request
    def _no_controls_in_path_or_query() -> None:
        _refuse_controls("path", request.path)
        for key, value in request.args.items(multi=True):
            _refuse_controls("query", key + value)


def check_form_text(where: str, value: str) -> None:
    """A multipart form value or file name: no control characters."""
    _refuse_controls(where, value)
