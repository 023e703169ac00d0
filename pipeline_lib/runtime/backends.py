"""Inference backends behind two small interfaces, so ONNX Runtime and OpenVINO plug in the same way.

`LMBackend.run(feed)` takes the LM step's named inputs (NumPy arrays) and returns its named outputs
(NumPy arrays); `DecoderBackend.run(hidden)` maps [B, hidden, T] to the pre-ISTFT spectrum. Both
expose the input and output names of the loaded model so that the runtime can check them against
the exported JSON configs. Models are compiled once, at construction.

Imports of onnxruntime / openvino happen lazily (ort_backend, openvino_backend), so a missing package is a clear
`MissingBackendError` with the install command. The backend names come from pipeline_lib.registry;
OpenVINO's IR loading and compile settings from pipeline_lib.openvino_ir, which the conversion uses
too (the runtime never imports the factory's conversion code).

Thread safety and streams. Every backend object holds one lock, and each `run` (and
`reset_state`) holds it for the whole call: calls from several threads are serialised, never
interleaved inside a model. What a generation keeps between its calls (ONNX Runtime's IO binding
and output buffers, OpenVINO's infer request with its KV-cache state) belongs to a per-stream
context: `LMBackend.stream()` leases one (a context manager; contexts are pooled and reused), so
two generations on one backend, in two threads or interleaved in one, never see each other's
buffers or state. `LMBackend.run` itself uses one default context: direct callers that keep its
outputs across another caller's `run`, or interleave two stateful generations on it, must lease
streams instead. Shared between all contexts: the compiled models (weights) and the lock.

Layout: backend_base (the interfaces, the stream pool, the heap settings), ort_backend (ONNX Runtime),
openvino_backend (OpenVINO); this module picks one per model (`load_backends`) and re-exports them.
"""

from __future__ import annotations

from pathlib import Path

from pipeline_lib.errors import InputError
from pipeline_lib.registry import normalize_backend
from pipeline_lib.runtime.backend_base import (
    HOW_TO_PRODUCE,
    DecoderBackend,
    LMBackend,
    fix_malloc_mmap_threshold,
    release_free_heap,
    require_file,
)
from pipeline_lib.runtime.openvino_backend import OpenVinoDecoder, OpenVinoLM
from pipeline_lib.runtime.ort_backend import OrtDecoder, OrtLM

__all__ = [
    "HOW_TO_PRODUCE",
    "LMBackend",
    "DecoderBackend",
    "OrtLM",
    "OrtDecoder",
    "OpenVinoLM",
    "OpenVinoDecoder",
    "load_backends",
    "normalize_backend",
    "fix_malloc_mmap_threshold",
    "release_free_heap",
    "require_file",
]


def load_backends(
    backend: str,
    lm_path: Path,
    decoder_path: Path,
    num_threads: int,
    low_memory: bool = True,
    static_decode_width: int | None = OpenVinoLM.STATIC_DECODE_WIDTH,
    decoder_backend: str | None = None,
) -> tuple[LMBackend, DecoderBackend]:
    """Compile the LM with `backend` and the decoder with `decoder_backend` (default: `backend`), each
    'onnx_cpu' or 'openvino_cpu'; checks that the files exist. low_memory: ONNX Runtime's memory settings
    (see ort_backend.ort_session); OpenVINO ignores it. static_decode_width: OpenVINO's fixed-shape one-row decode
    model (see OpenVinoLM); ONNX Runtime ignores it."""
    backend = normalize_backend(backend)
    decoder_backend = normalize_backend(decoder_backend) if decoder_backend is not None else backend
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise InputError(f"num_threads must be an int >= 1, got {num_threads!r}")
    require_file(lm_path, "LM step model")
    require_file(decoder_path, "decoder model")
    for name, path, which in ((backend, lm_path, "LM"), (decoder_backend, decoder_path, "decoder")):
        if name == "onnx_cpu" and path.suffix != ".onnx":
            raise InputError(f"{path}: ONNX Runtime runs .onnx files, not {path.suffix or 'this file'}; give the "
                             f"{which} the backend 'openvino_cpu' or pass its .onnx file")
    lm = (OrtLM(lm_path, num_threads, low_memory) if backend == "onnx_cpu"
          else OpenVinoLM(lm_path, num_threads, static_decode_width))
    decoder = (OrtDecoder(decoder_path, num_threads, low_memory) if decoder_backend == "onnx_cpu"
               else OpenVinoDecoder(decoder_path, num_threads))
    return lm, decoder
