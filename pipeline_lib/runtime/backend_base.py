"""The two backend interfaces (`LMBackend`, `DecoderBackend`), their per-stream context pool, and what
every backend shares: the model-file check and glibc's heap settings. See runtime.backends for the contract
(threads and streams); ort_backend and openvino_backend implement it."""

from __future__ import annotations

import contextlib
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from pipeline_lib.errors import ModelFileError

HOW_TO_PRODUCE = (
    "produce the export folder with `soprano-onnx export --checkpoint CKPT --out DIR` "
    "or rebuild the pipeline with `dvc repro`"
)


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ModelFileError(f"{path}: {what} not found; {HOW_TO_PRODUCE}.")
    return path


class _Backend(ABC):
    path: Path
    input_names: list[str]
    output_names: list[str]
    _lock: threading.Lock


class _StreamPool:
    """Per-stream contexts of one backend, made by `factory` on demand and reused once returned."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self._free: list[Any] = []
        self._guard = threading.Lock()

    @contextlib.contextmanager
    def lease(self) -> Iterator[Any]:
        with self._guard:
            ctx = self._free.pop() if self._free else None
        if ctx is None:
            ctx = self._factory()
        try:
            yield ctx
        finally:
            ctx.release()
            with self._guard:
                self._free.append(ctx)


class LMBackend(_Backend):
    """One LM step: feed {input name: array} -> {output name: array}. The returned arrays may be
    views of the context's own buffers, valid until that context's next `run`: copy what you keep.
    The feed's arrays must not change while `run` executes (they may be read in place).
    `stream()` leases a per-stream context with the same `run` / `reset_state` / `static_kv_width`
    / `stateful` interface (see the module docstring); a generation runs on one such context."""

    stateful = False

    @abstractmethod
    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def stream(self) -> contextlib.AbstractContextManager[Any]:
        """A context manager that yields a context of its own for one generation (pooled). A
        backend that keeps no per-generation state (no pool: e.g. a test double) is its own context."""
        pool = getattr(self, "_streams", None)
        return pool.lease() if pool is not None else contextlib.nullcontext(self)

    _streams: _StreamPool | None = None

    def static_kv_width(self, batch: int) -> int | None:
        """The KV cache width (past columns) at which decode steps of `batch` rows run fastest, if
        this backend has such a width (a model compiled for those exact shapes); None: any width.
        The generation loop then keeps the cache at that width for as long as it fits."""
        return None


class DecoderBackend(_Backend):
    """Decoder up to the spectrum: hidden [B, C, T] float32 -> spectrum (layout from the ISTFT config)."""

    @abstractmethod
    def run(self, hidden: np.ndarray) -> np.ndarray: ...


_MMAP_THRESHOLD_SET = False


def fix_malloc_mmap_threshold(threshold: int = 1 << 20) -> bool:
    """glibc only: serve allocations of `threshold` bytes or more by mmap, always, so that freeing them
    returns the pages to the OS. (By default glibc raises its mmap threshold dynamically, up to 32 MiB,
    each time a large block is freed; ONNX Runtime's load - protobuf, initializers, prepacked copies -
    then leaves hundreds of MiB of freed but resident heap: about 300 MiB with the 80M model.)
    Process-wide and idempotent; False where it does not apply (not glibc)."""
    global _MMAP_THRESHOLD_SET
    if _MMAP_THRESHOLD_SET:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        _MMAP_THRESHOLD_SET = bool(libc.mallopt(-3, int(threshold)))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False
    return _MMAP_THRESHOLD_SET


_LIBC: Any = None


def release_free_heap() -> bool:
    """glibc only: `malloc_trim(0)`, handing the heap's free pages back to the OS. Blocks under the
    mmap threshold (see fix_malloc_mmap_threshold) are served from the heap; once freed, glibc keeps
    their pages resident. ONNX Runtime's first run at a new input size allocates and frees ~0.4 MiB
    per prompt token there (80M LM, fp32: +33 MiB for a 71-token prefill, measured; a second run at
    that size adds ~3 MiB), and the decoder's intermediates for a long sentence ~25 MiB. Where it is
    called (2-8 ms a call, measured after 4-sentence batches: under 1% of a synthesis): SopranoTTS after
    each LM pass and decoder call in low_memory mode; `kv_cache.prefill_row` after a prompt of
    TRIM_AFTER_PREFILL_TOKENS or more (any path, the server's too); the scheduler when it parks a job's
    rows (backpressure). Not after each step or streaming window.
    False where it does not apply (not glibc)."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - AttributeError where it is not glibc
        except (OSError, AttributeError):
            _LIBC = False
    if not _LIBC:
        return False
    _LIBC.malloc_trim(0)
    return True
