"""The server's OpenAPI document: what it really sends, so that generated clients and contract
testers (schemathesis, in tests/test_schemathesis.py) can trust it.

FastAPI's own document is the start (paths, the request body from `SpeechBody`); `build` then:
- lists on each operation every status the server sends, each error with OpenAI's error body
  (`Error`), and no 422 (request validation is a 400 here);
- types the speech response as the audio media type of each response_format, and
  `text/event-stream` for stream_format "sse";
- gives the 200 bodies of the JSON routes their schemas (`ModelList`, `Model`, `VoiceList`,
  `ServerInfo`, `Health`);
- puts this server's settings in: `input`'s maxLength (max_input_chars), `max_new_tokens`'
  maximum (the server's cap), and a bearer security scheme on /v1 when an api_key is set;
- documents the `x-request-id` header on every response, and the speech response's
  `x-soprano-hallucinations` / `x-soprano-hallucination-retries` (server.app).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from pipeline_lib.audio.encode import FORMATS
from pipeline_lib.server.middleware import REQUEST_ID_HEADER
from pipeline_lib.server.schemas import MODELS, VOICES

__all__ = ["build", "STATUSES"]

_NULLABLE_STRING = {"type": ["string", "null"]}
SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": {
        "type": "object", "required": ["error"], "additionalProperties": False,
        "description": "OpenAI's error body.",
        "properties": {"error": {
            "type": "object", "required": ["message", "type", "param", "code"], "additionalProperties": False,
            "properties": {"message": {"type": "string", "minLength": 1}, "type": {"type": "string"},
                           "param": _NULLABLE_STRING, "code": _NULLABLE_STRING},
        }},
    },
    "Model": {
        "type": "object", "required": ["id", "object", "created", "owned_by"], "additionalProperties": False,
        "properties": {"id": {"type": "string", "enum": list(MODELS)}, "object": {"const": "model"},
                       "created": {"type": "integer"}, "owned_by": {"type": "string"}},
    },
    "ModelList": {
        "type": "object", "required": ["object", "data"], "additionalProperties": False,
        "properties": {"object": {"const": "list"},
                       "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}}},
    },
    "VoiceList": {
        "type": "object", "required": ["voices", "default"], "additionalProperties": False,
        "properties": {
            "voices": {"type": "array", "items": {
                "type": "object", "required": ["id", "name", "alias_of"], "additionalProperties": False,
                "properties": {"id": {"type": "string", "enum": list(VOICES)}, "name": {"type": "string"},
                               "alias_of": _NULLABLE_STRING}}},
            "default": {"type": "string", "enum": list(VOICES)},
        },
    },
    "ServerInfo": {
        "type": "object",
        "required": ["backend", "lm_precision", "decoder_precision", "threads", "sample_rate", "max_batch",
                     "max_queue", "model", "formats", "max_input_chars"],
        "properties": {
            "backend": {"type": "string"}, "decoder_backend": {"type": "string"},
            "models": _NULLABLE_STRING,
            "lm_precision": {"type": "string"}, "decoder_precision": {"type": "string"},
            "threads": {"type": "integer", "minimum": 1}, "sample_rate": {"type": "integer", "minimum": 1},
            "max_batch": {"type": "integer", "minimum": 1}, "max_queue": {"type": "integer", "minimum": 1},
            "model": {"type": "string"}, "model_dir": {"type": "string"},
            "formats": {"type": "array", "items": {"type": "string", "enum": list(FORMATS)}},
            "max_input_chars": {"type": "integer", "minimum": 1},
            "max_new_tokens": {"type": "integer", "minimum": 1},
        },
    },
    "SpeechEvent": {
        "description": "One server-sent event of stream_format 'sse' (OpenAI's): its data is JSON.",
        "type": "object", "required": ["data"],
        "properties": {"data": {"type": "string", "contentMediaType": "application/json", "contentSchema": {"oneOf": [
            {"type": "object", "required": ["type", "audio"], "additionalProperties": False,
             "properties": {"type": {"const": "speech.audio.delta"},
                            "audio": {"type": "string", "contentEncoding": "base64",
                                      "description": "the next bytes of the response_format's audio"}}},
            {"type": "object", "required": ["type", "usage"], "additionalProperties": False,
             "properties": {"type": {"const": "speech.audio.done"}, "usage": {
                 "type": "object", "required": ["input_tokens", "output_tokens", "total_tokens"],
                 "additionalProperties": False,
                 "properties": {k: {"type": "integer", "minimum": 0}
                                for k in ("input_tokens", "output_tokens", "total_tokens")}},
                 "hallucinations": {"type": "integer", "minimum": 0,
                                    "description": "sentences the hallucination guard flagged (each attempt)"},
                 "hallucination_retries": {"type": "integer", "minimum": 0,
                                           "description": "flagged sentences generated again"}}},
            {"type": "object", "required": ["type", "error"], "additionalProperties": False,
             "properties": {"type": {"const": "error"}, "error": {"$ref": "#/components/schemas/Error/properties/error"}}},
        ]}}},
    },
    "Health": {
        "type": "object", "required": ["status"], "additionalProperties": False,
        "properties": {"status": {"type": "string", "enum": ["ok", "loading", "draining", "failed"]},
                       "error": {"type": "string"}},
    },
}

_WHY = {
    400: "Bad request: the body is not a JSON object of the speech parameters, or a value is out of range.",
    401: "No or wrong API key (the server was started with --api-key).",
    404: "No such model.",
    413: "The request body exceeds max_body_bytes.",
    429: "The queue is full: retry after Retry-After seconds.",
    503: "The model is loading, failed to load, or the server is shutting down.",
}
# The statuses each operation sends besides 200 (401 is added on /v1 when an api_key is set).
STATUSES: dict[tuple[str, str], tuple[int, ...]] = {
    ("post", "/v1/audio/speech"): (400, 413, 429, 503),
    ("get", "/v1/models"): (503,),
    ("get", "/v1/models/{model_id}"): (404, 503),
    ("get", "/v1/audio/voices"): (503,),
    ("get", "/v1/server/info"): (503,),
    ("get", "/health"): (503,),
}
_OK_SCHEMA = {"/v1/models": "ModelList", "/v1/models/{model_id}": "Model", "/v1/audio/voices": "VoiceList",
              "/v1/server/info": "ServerInfo", "/health": "Health"}
_REQUEST_ID = {REQUEST_ID_HEADER: {"description": "The request's id (the client's x-request-id when it sent a usable "
                                                  "one); the access log names it.",
                                   "required": True, "schema": {"type": "string", "minLength": 1}}}
_GUARD_HEADERS = {
    "x-soprano-hallucinations": {"description": "Sentences the hallucination guard flagged before the audio began "
                                                "(guarded requests; 0 without the guard; the whole response's count is in the "
                                                "SSE done event and the metrics).",
                                 "required": True, "schema": {"type": "string", "pattern": "^[0-9]+$"}},
    "x-soprano-hallucination-retries": {"description": "Flagged sentences generated again before the audio began.",
                                        "required": True, "schema": {"type": "string", "pattern": "^[0-9]+$"}},
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "string"}}}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _speech_ok() -> dict[str, Any]:
    binary = {"schema": {"type": "string", "format": "binary"}}
    content = {fmt.content_type: dict(binary) for fmt in FORMATS.values()}
    content["text/event-stream"] = {"schema": _ref("SpeechEvent")}
    return {"description": "The audio, streamed as it is generated, in the response_format's media type "
                           "(text/event-stream for stream_format 'sse').",
            "headers": {**_REQUEST_ID, **_GUARD_HEADERS}, "content": content}


def build(app: FastAPI, *, max_input_chars: int, max_new_tokens: int, api_key: bool) -> dict[str, Any]:
    """The document for `app` (see the module docstring)."""
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas.update(SCHEMAS)
    body = schemas["SpeechBody"]["properties"]
    body["input"]["maxLength"] = max_input_chars
    body["voice"]["anyOf"][0]["enum"] = list(VOICES)
    body["max_new_tokens"]["anyOf"][0]["maximum"] = max_new_tokens
    if api_key:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            statuses = STATUSES.get((method, path))
            if statuses is None:
                raise AssertionError(f"{method.upper()} {path}: add the statuses it sends to server.openapi.STATUSES")
            if api_key and path.startswith("/v1/"):
                statuses = tuple(sorted((*statuses, 401)))
                op["security"] = [{"bearer": []}]
            responses: dict[str, Any] = {}
            if (method, path) == ("post", "/v1/audio/speech"):
                responses["200"] = _speech_ok()
            else:
                responses["200"] = {"description": "OK", "headers": dict(_REQUEST_ID),
                                    "content": {"application/json": {"schema": _ref(_OK_SCHEMA[path])}}}
            for status in statuses:
                schema = "Health" if path == "/health" else "Error"
                headers = {**_REQUEST_ID, **(_RETRY_AFTER if status in (429, 503) else {})}
                responses[str(status)] = {"description": _WHY[status] if path != "/health" else "Not ready.",
                                          "headers": headers,
                                          "content": {"application/json": {"schema": _ref(schema)}}}
            op["responses"] = responses
    return doc
