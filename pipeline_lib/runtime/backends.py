"""Inference backends behind two small interfaces, so ONNX Runtime and OpenVINO plug in the same way.

`LMBackend.run(feed)` takes the LM step's named inputs (NumPy arrays) and returns its named outputs
(NumPy arrays); `DecoderBackend.run(hidden)` maps [B, hidden, T] to the pre-ISTFT spectrum. Both
expose the input and output names of the loaded model so that the runtime can check them against
the exported JSON configs. Models are compiled once, at construction.

Imports of onnxruntime / openvino happen here, lazily, so a missing package is a clear
`MissingBackendError` with the install command.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pipeline_lib.convert import OV_F32_CONFIG, load_openvino_model
from pipeline_lib.errors import MissingBackendError, ModelFileError

__all__ = [
    "BACKENDS",
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
]

BACKENDS = ("onnx_cpu", "openvino_cpu")
_ALIASES = {"onnx": "onnx_cpu", "ort": "onnx_cpu", "onnxruntime": "onnx_cpu", "openvino": "openvino_cpu", "ov": "openvino_cpu"}
HOW_TO_PRODUCE = (
    "produce the export folder with `soprano-onnx export --checkpoint CKPT --out DIR` "
    "or rebuild the pipeline with `dvc repro`"
)


def normalize_backend(name: str) -> str:
    if not isinstance(name, str):
        raise ValueError(f"backend must be a string, one of {BACKENDS}; got {name!r}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)} (aliases: onnx, openvino)")
    return key


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ModelFileError(f"{path}: {what} not found; {HOW_TO_PRODUCE}.")
    return path


class _Backend(ABC):
    path: Path
    input_names: list[str]
    output_names: list[str]


class LMBackend(_Backend):
    """One LM step: feed {input name: array} -> {output name: array}. The returned arrays may be
    views of the backend's own buffers (OpenVINO), valid until the next `run`: copy what you keep.
    The feed's arrays must not change while `run` executes (they may be read in place)."""

    @abstractmethod
    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class DecoderBackend(_Backend):
    """Decoder up to the spectrum: hidden [B, C, T] float32 -> spectrum (layout from the ISTFT config)."""

    @abstractmethod
    def run(self, hidden: np.ndarray) -> np.ndarray: ...


def _import_ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise MissingBackendError(
            "backend 'onnx_cpu' needs onnxruntime, which is not installed: pip install onnxruntime"
        ) from exc
    return ort


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
    that size adds ~3 MiB), and the decoder's intermediates for a long sentence ~25 MiB. The runtime
    calls this after each LM pass and decoder call in low_memory mode (about a millisecond).
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


def _ort_session(path: Path, num_threads: int, low_memory: bool = True) -> Any:
    """low_memory (default): no CPU memory arena (its chunks, sized for the largest batch seen, stay
    allocated) and a fixed glibc mmap threshold (see fix_malloc_mmap_threshold). Measured on the
    80M model, 2 threads: peak RSS of a 128-token synthesis 553 MiB instead of 580-870 MiB (the
    load-time peak varied run to run); the bench process (synthesis, streaming, an 8-sentence batch)
    655-659 instead of 933-963 MiB; per-token time the same within noise (9.43 vs 9.51 ms).
    Prepacking stays on: turning it off saves nothing once freed memory is returned, and makes decode
    steps ~40% slower."""
    ort = _import_ort()
    if low_memory:
        fix_malloc_mmap_threshold()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(num_threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if low_memory:
        opts.enable_cpu_mem_arena = False
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any load failure means an unusable file
        raise ModelFileError(
            f"{path}: cannot be loaded by onnxruntime (corrupted or not an ONNX model): "
            f"{str(exc).strip()[:300]}; re-create it: {HOW_TO_PRODUCE}."
        ) from exc


class _OrtBase:
    def __init__(self, path: Path, num_threads: int, low_memory: bool = True) -> None:
        self.path = path
        self.session = _ort_session(path, num_threads, low_memory)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]


_ORT_FLOAT = "tensor(float)"


class OrtLM(_OrtBase, LMBackend):
    """Runs with IO binding: each output is written straight into a NumPy buffer this object keeps
    and reuses while the output's shape stays the same (the generation loop's shapes change once per
    KV bucket). Plain `session.run` has ONNX Runtime allocate every output afresh (without the
    arena: new pages, page faults) and then copy it into a new NumPy array. The KV outputs are the
    big ones: measured on the 80M LM, 2 threads, 8 rows at 300 cached tokens, 9.1 instead of
    20.2 ms per step (int8) and 16.1 instead of 28.2 ms (fp32).

    Small outputs run plainly: binding costs ~0.3 ms per step in Python, more than it saves when no
    output reaches `BIND_MIN_BYTES` (one row: 150 KiB per KV output at 300 tokens, served from the
    heap without page faults; 8 rows: 1.2 MiB, each a fresh mmap under low_memory's malloc settings).
    Output shapes come from the model's symbolic dimensions (batch, sequence, past_sequence,
    total_sequence), resolved from the fed arrays; a model whose outputs cannot be resolved that way
    runs plainly."""

    BIND_MIN_BYTES = 1 << 20

    def __init__(self, path: Path, num_threads: int, low_memory: bool = True) -> None:
        super().__init__(path, num_threads, low_memory)
        self._in_dims = {i.name: i.shape for i in self.session.get_inputs()}
        outs = self.session.get_outputs()
        self._out_dims = {o.name: o.shape for o in outs} if all(o.type == _ORT_FLOAT for o in outs) else None
        self._buffers: dict[str, np.ndarray] = {}
        self._shape_cache: dict[tuple[Any, ...], dict[str, tuple[int, ...]] | None] = {}

    def _output_shapes(self, feed: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]] | None:
        """Output shapes, or None where IO binding does not apply (unresolvable, or all outputs small).
        Cached per input shapes: these repeat for a whole KV bucket."""
        key = (self.BIND_MIN_BYTES, *((name, np.shape(a)) for name, a in feed.items()))
        if key not in self._shape_cache:
            if len(self._shape_cache) > 256:
                self._shape_cache.clear()
            shapes = self._resolve_shapes(feed)
            if shapes is not None and 4 * max(math.prod(v) for v in shapes.values()) < self.BIND_MIN_BYTES:
                shapes = None
            self._shape_cache[key] = shapes
        return self._shape_cache[key]

    def _resolve_shapes(self, feed: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]] | None:
        if self._out_dims is None:
            return None
        sizes: dict[str, int] = {}
        for name, array in feed.items():
            for dim, size in zip(self._in_dims.get(name, ()), np.shape(array)):
                if isinstance(dim, str):
                    sizes[dim] = size
        try:
            return {name: tuple(d if isinstance(d, int) else sizes[d] for d in dims) for name, dims in self._out_dims.items()}
        except KeyError:
            return None

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        shapes = self._output_shapes(feed)
        if shapes is None:
            return dict(zip(self.output_names, self.session.run(self.output_names, dict(feed))))
        binding = self.session.io_binding()
        inputs = {name: np.ascontiguousarray(a) for name, a in feed.items()}  # kept alive until the run ends
        for name, a in inputs.items():
            binding.bind_cpu_input(name, a)
        out: dict[str, np.ndarray] = {}
        for name in self.output_names:
            buf = self._buffers.get(name)
            if buf is None or buf.shape != shapes[name]:
                buf = self._buffers[name] = np.empty(shapes[name], dtype=np.float32)
            binding.bind_output(name, "cpu", 0, np.float32, buf.shape, buf.ctypes.data)
            out[name] = buf
        self.session.run_with_iobinding(binding)
        return out


class OrtDecoder(_OrtBase, DecoderBackend):
    def run(self, hidden: np.ndarray) -> np.ndarray:
        return self.session.run(self.output_names[:1], {self.input_names[0]: hidden})[0]


def _import_openvino() -> Any:
    try:
        import openvino as ov
    except ImportError as exc:
        raise MissingBackendError(
            "backend 'openvino_cpu' needs OpenVINO, which is not installed: pip install 'soprano-onnx[openvino]'"
        ) from exc
    return ov


def _port_name(port: Any) -> str:
    """A tensor may carry several names (e.g. the ONNX output name and an internal '/norm/Mul_output_0'):
    prefer the plain, graph-interface one."""
    names = sorted(port.get_names())
    plain = [n for n in names if "/" not in n and ":" not in n]
    return (plain or names or [port.get_any_name()])[0]


class _OpenVinoBase:
    def __init__(self, path: Path, num_threads: int) -> None:
        ov = _import_openvino()
        self.path = path
        core = ov.Core()
        try:
            if path.suffix == ".xml":
                # Reads the IR once, after checking its .bin (missing, or of another model).
                model = load_openvino_model(path, core)
            else:
                model = core.read_model(str(path))
            self.compiled = core.compile_model(
                model, "CPU", {**OV_F32_CONFIG, "INFERENCE_NUM_THREADS": int(num_threads)}
            )
        except ModelFileError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ModelFileError(
                f"{path}: cannot be loaded by OpenVINO (corrupted or not an ONNX / IR model): "
                f"{str(exc).strip()[:300]}; re-create it: {HOW_TO_PRODUCE}."
            ) from exc
        self.request = self.compiled.create_infer_request()
        self.input_names = [_port_name(p) for p in self.compiled.inputs]
        self.output_names = [_port_name(p) for p in self.compiled.outputs]


class OpenVinoLM(_OpenVinoBase, LMBackend):
    """The request's input tensors wrap the fed arrays (shared memory) and are re-set only when the
    feed brings another array object: the generation loop feeds the same KV-cache and mask arrays,
    updated in place, for a whole bucket of steps (see generate.KVCache), so most steps set only
    input_ids and position_ids. An array fed here must therefore not be modified in place except to
    feed it again. Outputs are read in place (share_outputs): with copies of the 34 KV outputs in
    and out, a step was ~40% slower (80M LM, fp32, 2 threads: 14.6 vs 10.0 ms at 200 past tokens),
    and with 8 rows `infer()` alone, which copies every output, took 16-18 instead of 6 ms (int8)."""

    def __init__(self, path: Path, num_threads: int) -> None:
        super().__init__(path, num_threads)
        self._ov = _import_openvino()
        self._bound: dict[str, np.ndarray] = {}
        self._dtypes = {name: port.get_element_type().to_dtype() for name, port in zip(self.input_names, self.compiled.inputs)}

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, array in feed.items():
            if self._bound.get(name) is not array:
                array = np.ascontiguousarray(array, dtype=self._dtypes.get(name))
                self.request.set_tensor(name, self._ov.Tensor(array, shared_memory=True))
                self._bound[name] = array
        self.request.infer(share_outputs=True)  # no copy of the outputs (the KV cache is big)
        return {name: self.request.get_tensor(port).data for name, port in zip(self.output_names, self.compiled.outputs)}


class OpenVinoDecoder(_OpenVinoBase, DecoderBackend):
    def run(self, hidden: np.ndarray) -> np.ndarray:
        # share_inputs: no copy of the input; the output is copied out once (the request reuses it).
        return self.request.infer({self.input_names[0]: hidden}, share_inputs=True)[self.compiled.outputs[0]]


def load_backends(
    backend: str, lm_path: Path, decoder_path: Path, num_threads: int, low_memory: bool = True
) -> tuple[LMBackend, DecoderBackend]:
    """Compile both models with `backend` ('onnx_cpu' or 'openvino_cpu'); checks that the files exist.
    low_memory: ONNX Runtime's memory settings (see _ort_session); OpenVINO ignores it."""
    backend = normalize_backend(backend)
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be an int >= 1, got {num_threads!r}")
    require_file(lm_path, "LM step model")
    require_file(decoder_path, "decoder model")
    if backend == "onnx_cpu":
        return OrtLM(lm_path, num_threads, low_memory), OrtDecoder(decoder_path, num_threads, low_memory)
    return OpenVinoLM(lm_path, num_threads), OpenVinoDecoder(decoder_path, num_threads)
