"""The OpenAPI document: flask-openapi3 generates it from the views' pydantic models; this adds what it
cannot infer — submit bodies that depend on the configured service catalog, and our error envelope."""

from __future__ import annotations

from typing import Annotated, Any

from flask_openapi3 import OpenAPI
from pydantic import BaseModel, WithJsonSchema

from gateway_core.catalog import TranscribeOptions
from gateway_web.errors import ErrorEnvelope

REF = "#/components/schemas/{model}"


class TranscribeUpload(TranscribeOptions):
    """A transcription job with the audio uploaded as the multipart part ``file``."""

    file: Annotated[bytes, WithJsonSchema({"type": "string", "format": "binary"})]


class JobgateOpenAPI(OpenAPI):
    """flask-openapi3's app, with request bodies registered per (path, content type)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.request_bodies: dict[str, dict[str, type[BaseModel]]] = {}

    def _schema_ref(self, spec: dict[str, Any], model: type[BaseModel]) -> dict[str, str]:
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        schema = model.model_json_schema(ref_template=REF)
        for name, sub in schema.pop("$defs", {}).items():
            schemas.setdefault(name, sub)
        schemas[model.__name__] = schema
        return {"$ref": REF.format(model=model.__name__)}

    def generate_spec_json(self) -> None:
        super().generate_spec_json()
        spec = self.spec_json
        envelope = self._schema_ref(spec, ErrorEnvelope)
        spec["components"]["schemas"].pop(self.validation_error_model.__name__, None)
        for path, bodies in self.request_bodies.items():
            op = spec["paths"][path]["post"]
            op["requestBody"] = {
                "required": True,
                "content": {ctype: {"schema": self._schema_ref(spec, m)} for ctype, m in bodies.items()},
            }
        for path_item in spec["paths"].values():
            for op in path_item.values():
                responses = op["responses"]
                responses.pop(str(self.validation_error_status), None)
                if op.get("parameters") or op.get("requestBody"):
                    responses[str(self.validation_error_status)] = {
                        "description": "Validation failed; details.fields lists each bad field",
                        "content": {"application/json": {"schema": envelope}},
                    }
                # Every request passes the input guard first: control characters in the path or query.
                responses.setdefault("400", {"description": "Bad request", "content": {"application/json": {}}})
                responses["400"]["content"] = {"application/json": {"schema": envelope}}
