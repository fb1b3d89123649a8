"""The router's OpenAPI document, made honest about what the routes really take and answer.

The generation routes read their body themselves (to bound its size while it arrives and to
accept JSON whatever the Content-Type says), so FastAPI cannot see it: this module declares
the request bodies (required, JSON, the pydantic models' schemas), both answers of a
generation route (JSON, or an SSE ``text/event-stream`` when ``stream`` is true), the error
bodies with their status codes, ``/metrics`` as Prometheus text and, when API keys are on,
the bearer scheme on ``/v1/*``. Clients' code generators and schemathesis read it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from router.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
)

_REF = "#/components/schemas/{model}"
_BODIES: dict[str, tuple[type[BaseModel], type[BaseModel]]] = {
    "/v1/completions": (CompletionRequest, CompletionResponse),
    "/v1/chat/completions": (ChatCompletionRequest, ChatCompletionResponse),
}
_ERRORS = {
    "400": "Invalid request (OpenAI error body)",
    "401": "Missing or wrong API key",
    "404": "Unknown model",
    "413": "Request body over the limit",
    "429": "At capacity; see Retry-After",
    "503": "Draining or no healthy worker; see Retry-After",
    "504": "The request timed out",
}


def _ref(model: type[BaseModel], schemas: dict[str, Any]) -> dict[str, str]:
    """A reference to ``model``'s schema, added (with its nested models) to ``schemas``."""
    schema = model.model_json_schema(ref_template=_REF)
    schemas.update(schema.pop("$defs", {}))
    schemas[model.__name__] = schema
    return {"$ref": _REF.format(model=model.__name__)}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def document_api(app: FastAPI, api_keys_required: bool) -> None:
    """Replace ``app.openapi`` with one that describes the routes as they behave."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        error = _ref(ErrorResponse, schemas)
        for path, (request_model, response_model) in _BODIES.items():
            operation = doc["paths"][path]["post"]
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": _ref(request_model, schemas)}},
            }
            ok = _json(_ref(response_model, schemas), "The answer, or an SSE stream of chunks")
            ok["content"]["text/event-stream"] = {"schema": {"type": "string"}}
            operation["responses"] = {
                "200": ok,
                **{code: _json(error, text) for code, text in _ERRORS.items()},
            }
        doc["paths"]["/metrics"]["get"]["responses"] = {
            "200": {
                "description": "Prometheus text exposition",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        }
        health = {"type": "object", "properties": {"status": {"type": "string"}}}
        doc["paths"]["/health"]["get"]["responses"] = {
            "200": _json(health, "Healthy, with the number of workers per role"),
            "503": _json(health, "Draining, or no healthy worker"),
        }
        if api_keys_required:
            schemes = doc["components"].setdefault("securitySchemes", {})
            schemes["bearer"] = {"type": "http", "scheme": "bearer"}
            for path, methods in doc["paths"].items():
                if path.startswith("/v1/"):
                    for operation in methods.values():
                        operation["security"] = [{"bearer": []}]
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
