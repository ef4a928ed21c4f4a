"""The ingress's OpenAPI document (`/openapi.json`): its request and response schemas, stated by hand.

The routes read a raw `Request` and validate the body themselves (faster, and every error gets the
OpenAI error body), so FastAPI sees no body models. `operation()` states one route's body and
responses (FastAPI's `openapi_extra`) as references to pydantic models; `publish(app)` puts those
models' JSON schemas under the document's `components/schemas`, where the references point.
"""

from typing import Optional

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from serving.protocol import ErrorResponse

_REF = "#/components/schemas/{model}"

_ERRORS = {
    400: "Invalid request; `error.param` names the parameter.",
    401: "With API keys on (docs/security.md): a missing or wrong `Authorization: Bearer` key.",
    404: "No such model (`error.code` is `model_not_found`).",
    413: "The body is larger than `router.limits.max_body_bytes`.",
    429: "Overloaded; retry after `Retry-After` seconds.",
    503: "Overloaded (a full queue), or the model did not answer in time or its engine failed; retry after "
         "`Retry-After` seconds.",
}
# One server-sent event (before OpenAPI 3.2 and its `itemSchema`, `schema` describes each event)
_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {
    "type": "string", "description": "A chunk object as JSON; the last event's is `[DONE]`."}}}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before a retry.", "schema": {"type": "integer"}}}

# Every model an operation refers to, with the mode of its schema (validation: a body we read,
# serialization: one we send); `publish` turns them into components.
_models: dict[type[BaseModel], JsonSchemaMode] = {}


def _ref(model: type[BaseModel], mode: JsonSchemaMode) -> dict:
    _models[model] = mode
    return {"$ref": _REF.format(model=model.__name__)}


def operation(bodies: tuple[type[BaseModel], ...] = (), response: Optional[type[BaseModel]] = None,
              errors: tuple[int, ...] = tuple(_ERRORS), stream: bool = False) -> dict:
    """A route's `openapi_extra`: its JSON body (one of `bodies`), its 200 (`response`, and with
    `stream` server-sent events) and its error responses (each the OpenAI error body)."""
    out: dict = {"responses": {}}
    if bodies:
        refs = [_ref(m, "validation") for m in bodies]
        schema = refs[0] if len(refs) == 1 else {"oneOf": refs}
        out["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
    if response is not None:
        content = {"application/json": {"schema": _ref(response, "serialization")}}
        description = "The response."
        if stream:
            content["text/event-stream"] = {"schema": _EVENT}
            description = "The response; with `stream: true`, server-sent events of chunk objects."
        out["responses"]["200"] = {"description": description, "content": content}
    for status in errors:
        error = {"description": _ERRORS[status],
                 "content": {"application/json": {"schema": _ref(ErrorResponse, "serialization")}}}
        if status in (429, 503):
            error["headers"] = _RETRY_AFTER
        out["responses"][str(status)] = error
    return out


def publish(app: FastAPI) -> None:
    """Makes `app.openapi()` carry the schemas of the models that `operation()` referred to."""

    def openapi() -> dict:
        doc = FastAPI.openapi(app)  # built once (and again after the routes change), then cached
        refs, top = models_json_schema(list(_models.items()), ref_template=_REF)
        # NOTE: pydantic renames a model's schema only when two share a name; ours do not
        assert all(ref == {"$ref": _REF.format(model=m.__name__)} for (m, _), ref in refs.items())
        doc.setdefault("components", {}).setdefault("schemas", {}).update(top["$defs"])
        return doc

    app.openapi = openapi
