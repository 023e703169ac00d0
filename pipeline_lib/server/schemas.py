"""Request and response shapes of the OpenAI-compatible speech API.

`SpeechBody` is OpenAI's `POST /v1/audio/speech` body (model, input, voice, response_format, speed,
instructions, stream_format) plus this server's extensions: the runtime's sampling settings
(temperature, top_p, top_k, repetition_penalty, seed, max_new_tokens; left out = the runtime's
defaults, greedy), the hallucination guard's (hallucination_guard, hallucination_retries; left out = the
server's defaults, runtime.rules) and `sample_rate`. Unknown fields are rejected, as OpenAI does.

Soprano is one model with one voice: OpenAI's model and voice names are accepted as aliases of
ours, so OpenAI clients work unchanged. `instructions` (gpt-4o-mini-tts's voice direction) is
accepted and ignored: Soprano has no way to follow it.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

from pipeline_lib.runtime.rules import MAX_RETRIES
from pipeline_lib.runtime.sampling import DEFAULT_MAX_NEW_TOKENS as MAX_NEW_TOKENS  # also the most a request may ask
from pipeline_lib.runtime.scheduler import SpeechRequest
from pipeline_lib.audio.encode import FORMATS, SAMPLE_RATES

__all__ = [
    "MODEL_ID",
    "MODEL_ALIASES",
    "VOICE_ID",
    "VOICE_ALIASES",
    "SAMPLING_FIELDS",
    "GUARD_FIELDS",
    "SpeechBody",
    "error_body",
    "model_list",
    "model_object",
    "voice_list",
]

MODEL_ID = "soprano"
MODEL_ALIASES = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts", "gpt-4o-mini-tts-2025-03-20", "gpt-4o-mini-tts-2025-12-15")
VOICE_ID = "soprano"
VOICE_ALIASES = ("alloy", "ash", "ballad", "cedar", "coral", "echo", "fable", "marin", "nova", "onyx", "sage",
                 "shimmer", "verse")
OWNER = "soprano-onnx"

ResponseFormat = Literal[tuple(FORMATS)]  # type: ignore[valid-type]
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "seed", "max_new_tokens")
GUARD_FIELDS = ("hallucination_guard", "hallucination_retries")
assert set(SAMPLING_FIELDS + GUARD_FIELDS) <= {f.name for f in fields(SpeechRequest)}


VOICES = (VOICE_ID, *VOICE_ALIASES)
MODELS = (MODEL_ID, *MODEL_ALIASES)


def _doc(default: Any = None, **schema: Any) -> Any:
    """A field's bounds for the OpenAPI document (what clients and schemathesis generate from), put on
    the value's own branch of an optional field's anyOf; the runtime checks the values (its InputError
    is the 400 a client gets), pydantic only the types."""

    def extra(js: dict[str, Any]) -> None:
        branches = [b for b in js.get("anyOf", [js]) if b.get("type") != "null"]
        branches[0].update(schema)

    return Field(default, json_schema_extra=extra)


class VoiceRef(BaseModel):
    """OpenAI's voice object form: {"id": "..."}."""

    model_config = ConfigDict(extra="forbid")
    id: StrictStr = _doc(..., enum=list(VOICES))


class SpeechBody(BaseModel):
    """See the module docstring; `input`'s upper bound is the server's max_input_chars, checked by
    the route (it is a setting, not part of the schema)."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr = _doc(..., enum=list(MODELS))
    input: StrictStr = Field(min_length=1)
    voice: StrictStr | VoiceRef  # the OpenAPI document gives the string form the enum VOICES (server.openapi)
    response_format: ResponseFormat = "mp3"
    speed: StrictFloat = _doc(1.0, enum=[1.0])
    instructions: Optional[StrictStr] = None
    stream_format: Literal["audio", "sse"] = "audio"
    temperature: Optional[StrictFloat] = _doc(minimum=0, description="0 = greedy (the default)")
    top_p: Optional[StrictFloat] = _doc(exclusiveMinimum=0, maximum=1)
    top_k: Optional[StrictInt] = _doc(minimum=0, description="0 = off (the default)")
    repetition_penalty: Optional[StrictFloat] = _doc(exclusiveMinimum=0, description="1 = off")
    seed: Optional[StrictInt] = _doc(minimum=0)
    max_new_tokens: Optional[StrictInt] = _doc(minimum=1, maximum=MAX_NEW_TOKENS,
                                               description="audio tokens per sentence at most (default: the server's "
                                                           "max_new_tokens)")
    sample_rate: Optional[StrictInt] = _doc(enum=list(SAMPLE_RATES))
    hallucination_guard: Optional[StrictBool] = _doc(
        description="run the hallucination guard (a run of near-identical hidden states, as upstream soprano-tts); "
                    "default: the server's --hallucination-guard")
    hallucination_retries: Optional[StrictInt] = _doc(
        minimum=0, maximum=MAX_RETRIES,
        description="times a flagged sentence is generated again (> 0 turns the guard on); default: the server's")

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        if v not in (MODEL_ID, *MODEL_ALIASES):
            raise ValueError(f"unknown model {v!r}: use {MODEL_ID!r} (or an OpenAI alias: {', '.join(MODEL_ALIASES)})")
        return v

    @field_validator("voice")
    @classmethod
    def _known_voice(cls, v: str | VoiceRef) -> str:
        name = v.id if isinstance(v, VoiceRef) else v
        if name.lower() not in (VOICE_ID, *VOICE_ALIASES):
            raise ValueError(f"unknown voice {name!r}: Soprano has one voice, {VOICE_ID!r}; OpenAI's voice names "
                             f"({', '.join(VOICE_ALIASES)}) are aliases of it")
        return name.lower()

    @field_validator("input")
    @classmethod
    def _valid_unicode(cls, v: str) -> str:
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"input holds a lone UTF-16 surrogate (U+{ord(v[exc.start]):04X} at character {exc.start}), "
                "which is not text: send valid Unicode (a surrogate pair, escaped, is fine)"
            ) from None
        return v

    @field_validator("speed")
    @classmethod
    def _speed_one(cls, v: float) -> float:
        if v != 1.0:
            raise ValueError(f"speed {v!r} is not supported: Soprano speaks at its own pace; leave speed out or pass 1.0")
        return v

    def speech_request(self, max_new_tokens: int | None = None, guard: dict[str, Any] | None = None) -> SpeechRequest:
        """The scheduler's request: the fields given, the runtime's defaults for the rest, except that
        `max_new_tokens` (the server's cap, None: none) and `guard` (the server's GUARD_FIELDS
        defaults) are the defaults when the body leaves them out."""
        given = {k: getattr(self, k) for k in SAMPLING_FIELDS + GUARD_FIELDS if getattr(self, k) is not None}
        if max_new_tokens is not None:
            given.setdefault("max_new_tokens", max_new_tokens)
        for k, v in (guard or {}).items():
            given.setdefault(k, v)
        return SpeechRequest(text=self.input, **given)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def model_list(created: int) -> dict[str, Any]:
    """GET /v1/models: OpenAI's list shape; the aliases are listed too, since clients check names."""
    return {"object": "list", "data": [model_object(m, created) for m in (MODEL_ID, *MODEL_ALIASES)]}


def model_object(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": OWNER}


def voice_list() -> dict[str, Any]:
    """GET /v1/audio/voices (OpenAI has no such route): {"voices": [{"id", "name", "alias_of"}]}, the
    shape Open WebUI and Kokoro-FastAPI use."""
    voices = [{"id": VOICE_ID, "name": "Soprano", "alias_of": None}]
    voices += [{"id": v, "name": v, "alias_of": VOICE_ID} for v in VOICE_ALIASES]
    return {"voices": voices, "default": VOICE_ID}
