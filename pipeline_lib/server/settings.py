"""The speech server's settings: `Settings`, what `create_app` serves and how, from arguments
(`soprano-onnx serve`, tests) or from SOPRANO_* environment variables (`Settings.from_env()`, the
factory `uvicorn --factory pipeline_lib.server.app:create_app`).

Construction validates every value (an InputError names the bad one) and fills the derived default
(max_body_bytes from max_input_chars); nothing is loaded or started here: pipeline_lib.server.app
does that with the settings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from pipeline_lib.errors import InputError
from pipeline_lib.runtime.rules import DEFAULT_GUARD, GuardSettings
from pipeline_lib.server.schemas import MAX_NEW_TOKENS

__all__ = ["Settings", "DEFAULT_MAX_INPUT_CHARS"]

DEFAULT_MAX_INPUT_CHARS = 4096  # OpenAI's limit
# A body holds the input (at worst 12 bytes per character: an astral character as a JSON escaped
# surrogate pair) and a few short fields.
_BYTES_PER_INPUT_CHAR = 12
_BODY_OVERHEAD = 16 * 1024
_ENV_PREFIX = "SOPRANO_"


@dataclass
class Settings:
    """What the server serves and how. `model`: an export or pipeline folder (SopranoTTS.from_dir);
    `tts`: an already built SopranoTTS instead (tests, benchmarks), shared, not closed by the app.
    `threads`, `max_batch`, `max_queue`: None = the runtime's and scheduler's defaults.
    `max_body_bytes`: None = 12 bytes per allowed input character + 16 KiB (64 KiB at 4096).
    `max_new_tokens`: audio tokens per sentence at most, and the default of a request that leaves
    max_new_tokens out (1 to the runtime's 512; a request asking for more gets 400).
    `max_unread_s`, `read_timeout_s`: backpressure (BatchScheduler): a response's audio generated
    ahead of what its client has read is bounded by max_unread_s seconds (its rows stop stepping);
    a client that reads nothing for read_timeout_s seconds is cancelled.
    `hallucination_guard`, `hallucination_retries`: the guard's defaults for requests that leave them
    out; `holdback` ("clean" or "sentence"): what a guarded response holds back (runtime.rules).
    `on_load_error`: called (from a worker thread) if loading fails; `soprano-onnx serve` stops.
    `precision`: `model` is a ROOT of <backend>/<precision>/ folders (artifacts/) and this names the models
    (SopranoTTS.from_dir(precision=...): "auto" picks for objective "batch", or a target, or LM+DECODER);
    the backends come from it and `backend` is not used."""

    model: Path | None = None
    backend: str = "onnx_cpu"
    precision: str | None = None
    threads: int | None = None
    max_batch: int | None = None
    max_queue: int | None = None
    api_key: str | None = None
    max_input_chars: int = DEFAULT_MAX_INPUT_CHARS
    max_body_bytes: int | None = None
    max_new_tokens: int = MAX_NEW_TOKENS
    max_unread_s: float = 5.0
    read_timeout_s: float = 30.0
    hallucination_guard: bool = DEFAULT_GUARD.enabled
    hallucination_retries: int = DEFAULT_GUARD.retries
    holdback: str = DEFAULT_GUARD.holdback
    tts: Any = None
    on_load_error: Callable[[BaseException], None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        from pipeline_lib.runtime.backends import normalize_backend

        if self.tts is None and self.model is None:
            raise InputError("no model: pass --model DIR (or set SOPRANO_MODEL) to an export folder")
        if self.model is not None:
            self.model = Path(self.model)
        try:
            self.backend = normalize_backend(self.backend)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        for name in ("max_unread_s", "read_timeout_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise InputError(f"{name} must be a number > 0 (seconds), got {v!r}")
        for name in ("threads", "max_batch", "max_queue", "max_body_bytes"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise InputError(f"{name} must be an int >= 1, got {v!r}")
        if isinstance(self.max_input_chars, bool) or not isinstance(self.max_input_chars, int) or self.max_input_chars < 1:
            raise InputError(f"max_input_chars must be an int >= 1, got {self.max_input_chars!r}")
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_NEW_TOKENS:
            raise InputError(f"max_new_tokens must be an int in 1..{MAX_NEW_TOKENS}, got {n!r}")
        GuardSettings(self.hallucination_guard, self.hallucination_retries, self.holdback)  # validates
        if self.max_body_bytes is None:
            self.max_body_bytes = _BODY_OVERHEAD + _BYTES_PER_INPUT_CHAR * self.max_input_chars
        self.api_key = self.api_key or None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """SOPRANO_MODEL, SOPRANO_BACKEND, SOPRANO_PRECISION, SOPRANO_THREADS, SOPRANO_MAX_BATCH, SOPRANO_MAX_QUEUE,
        SOPRANO_API_KEY, SOPRANO_MAX_INPUT_CHARS, SOPRANO_MAX_BODY_BYTES, SOPRANO_MAX_NEW_TOKENS,
        SOPRANO_MAX_UNREAD_S, SOPRANO_READ_TIMEOUT_S, SOPRANO_HALLUCINATION_GUARD (1/true or 0/false),
        SOPRANO_HALLUCINATION_RETRIES, SOPRANO_HOLDBACK (unset: the defaults)."""
        env = os.environ if environ is None else environ
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in ("tts", "on_load_error"):
                continue
            raw = env.get(_ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            if f.name in ("model", "backend", "api_key", "precision", "holdback"):
                kwargs[f.name] = raw
            elif f.name == "hallucination_guard":
                if raw.lower() not in ("1", "true", "0", "false"):
                    raise InputError(f"{_ENV_PREFIX}{f.name.upper()}={raw!r}: expected 1, true, 0 or false")
                kwargs[f.name] = raw.lower() in ("1", "true")
            elif f.name in ("max_unread_s", "read_timeout_s"):
                try:
                    kwargs[f.name] = float(raw)
                except ValueError:
                    raise InputError(f"{_ENV_PREFIX}{f.name.upper()}={raw!r}: expected a number of seconds") from None
            else:
                try:
                    kwargs[f.name] = int(raw)
                except ValueError:
                    raise InputError(f"{_ENV_PREFIX}{f.name.upper()}={raw!r}: expected an integer") from None
        if "precision" in kwargs and "backend" in kwargs:
            raise InputError(f"{_ENV_PREFIX}PRECISION names the backends (e.g. onnx-int4+openvino-int8); unset "
                             f"{_ENV_PREFIX}BACKEND")
        return cls(**kwargs)
