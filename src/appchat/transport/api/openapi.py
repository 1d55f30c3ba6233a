"""The OpenAPI 3.1 document of the server API, generated from the route table's models
(their JSON Schema, via pydantic)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from ... import __version__
from .models import ErrorReply
from .routing import Route

SCHEME = "apiKey"  # the OpenAPI security scheme: ``Authorization: Bearer <key>``


def openapi_document(routes: list[Route]) -> dict[str, Any]:
    """OpenAPI 3.1 from the route table's models (their JSON Schema, via pydantic)."""
    models: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [
        (ErrorReply, "serialization")
    ]
    for route in routes:
        if route.body_model is not None:
            models.append((route.body_model, "validation"))
        models += [
            (model, "serialization") for _, model in route.responses.values() if model is not None
        ]
    refs, top = models_json_schema(models, ref_template="#/components/schemas/{model}")
    schemas: dict[str, Any] = top.get("$defs", {})
    error_ref = refs[(ErrorReply, "serialization")]
    paths: dict[str, Any] = {}
    for route in routes:
        operation: dict[str, Any] = {
            "operationId": route.operation_id,
            "summary": route.summary,
            "description": route.description,
            "tags": list(route.tags),
            "security": [{SCHEME: []}],
            "parameters": [
                *_parameters(route.path_model, "path"),
                *_parameters(route.query_model, "query"),
                *_parameters(route.header_model, "header"),
            ],
            "responses": {},
        }
        if route.body_model is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": refs[(route.body_model, "validation")]}},
            }
        for status, (text, model) in sorted(route.responses.items()):
            operation["responses"][str(status)] = {"description": text}
            if model is not None:
                operation["responses"][str(status)]["content"] = {
                    "application/json": {"schema": refs[(model, "serialization")]}
                }
        for status in route.errors:
            operation["responses"][str(status)] = {
                "description": ERROR_TEXT[status],
                "content": {"application/json": {"schema": error_ref}},
            }
        paths.setdefault("/api" + route.path, {})[route.method.lower()] = operation
    paths["/api/openapi.json"] = {
        "get": {
            "operationId": "openapi",
            "summary": "This document",
            "security": [],
            "responses": {
                "200": {
                    "description": "OpenAPI 3.1",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            },
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "appchat server API",
            "version": __version__,
            "description": "For trusted backends: post into conversations, read them, close "
            "connections. Authenticate with an API key: `Authorization: Bearer <key>`.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an API key from --api-keys-file or --api-key "
                    "(not a WebSocket token)",
                }
            },
        },
    }


ERROR_TEXT = {
    400: "Malformed request: code bad_request",
    401: "Missing, unknown or revoked API key: code unauthorized",
    403: "Refused by a rule: code forbidden",
    404: "No such conversation, or the server API is off: code not_found",
    413: "The body is too large: code bad_request",
    415: "The body is encoded (Content-Encoding): code unsupported_type",
    503: "The database or the broker cannot serve now, try again: code unavailable",
}


def _parameters(model: type[BaseModel] | None, where: str) -> list[dict[str, Any]]:
    if model is None:
        return []
    schema = model.model_json_schema(by_alias=True)
    required = set(schema.get("required", ()))
    params = []
    for name, prop in schema["properties"].items():
        prop = dict(prop)
        description = prop.pop("description", None)
        prop.pop("title", None)
        if "anyOf" in prop:  # optional: the parameter is absent rather than null
            variants = prop.pop("anyOf")
            prop.update(next(s for s in variants if s.get("type") != "null"))
        if prop.get("default", 0) is None:
            del prop["default"]
        param: dict[str, Any] = {
            "name": name,
            "in": where,
            "required": where == "path" or name in required,
            "schema": prop,
        }
        if description:
            param["description"] = description
        params.append(param)
    return params
