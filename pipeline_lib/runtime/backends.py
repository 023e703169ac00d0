"""Inference backends behind two small interfaces, so ONNX Runtime and OpenVINO plug in the same way.

`LMBackend.run(feed)` takes the LM step's named inputs (NumPy arrays) and returns its named outputs
(NumPy arrays); `DecoderBackend.run(hidden)` maps [B, hidden, T] to the pre-ISTFT spectrum. Both
expose the input and output names of the loaded model so that the runtime can check them against
the exported JSON configs. Models are compiled once, at construction.

Imports of onnxruntime / openvino happen here, lazily, so a missing package is a clear
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
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from pipeline_lib.cpuinfo import INT8_DOT_FEATURES, missing_bf16, read_cpuinfo
from pipeline_lib.errors import InputError, MissingBackendError, ModelFileError, UnsupportedCpuError
from pipeline_lib.openvino_ir import import_openvino, load_openvino_model, ov_cpu_config
from pipeline_lib import registry
from pipeline_lib.registry import normalize_backend

log = logging.getLogger(__name__)

__all__ = [
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
    calls this after each LM pass and decoder call in low_memory mode, not on the streaming path
    (2-8 ms a call, measured after 4-sentence batches: under 1% of a synthesis).
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


def _ort_session(path: Path, num_threads: int, low_memory: bool = True, spin: bool = True,
                 mem_pattern: bool = True) -> Any:
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
    opts.enable_mem_pattern = bool(mem_pattern)
    if not spin:  # see OrtDecoder
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any load failure means an unusable file
        raise ModelFileError(
            f"{path}: cannot be loaded by onnxruntime (corrupted or not an ONNX model): "
            f"{str(exc).strip()[:300]}; re-create it: {HOW_TO_PRODUCE}."
        ) from exc


class _OrtBase:
    SPIN = True  # ONNX Runtime's default: the session's worker threads busy-wait after a run
    # ONNX Runtime's memory pattern: one block per run for all of the run's intermediate tensors.
    MEM_PATTERN = True

    def __init__(self, path: Path, num_threads: int, low_memory: bool = True) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.session = _ort_session(path, num_threads, low_memory, self.SPIN, self.MEM_PATTERN or not low_memory)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]


_ORT_FLOAT = "tensor(float)"
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


class OrtLM(_OrtBase, LMBackend):
    """Runs with one IO binding, kept across calls. Each output is written straight into a NumPy
    buffer this object keeps and reuses while the output's shape stays the same (plain
    `session.run` has ONNX Runtime allocate every output afresh - without the arena: new pages,
    page faults - and copy it into a new NumPy array: measured on the 80M LM, 2 threads, 8 rows at
    300 cached tokens, 9.1 instead of 20.2 ms per step (int8), 16.1 instead of 28.2 ms (fp32)).
    Each input is bound by its memory address and re-bound only when the feed brings another array
    object for it (held by weak reference, so a replaced cache array is freed at once): the
    generation loop feeds the same KV-cache and mask arrays, updated in place, for a whole bucket
    of steps, so most steps re-bind only input_ids and position_ids. Binding all 37 inputs each
    step (or a plain run, which converts them) cost 0.4-0.7 ms more per step, one row at 320 cached
    tokens: int8 3.91 against 4.34 ms (best of 8, same process, alternating), fp32 8.34 against 8.95.
    So, as with OpenVINO: an array fed here must not be modified in place except to feed it again.

    The binding, its output buffers and the bound inputs belong to a context (`_OrtStream`): one
    default context for `run`, and one per leased `stream()`.

    Output shapes come from the model's symbolic dimensions (batch, sequence, past_sequence,
    total_sequence), resolved from the fed arrays; a model whose outputs cannot be resolved that way
    (or a feed that does not name every input) runs plainly.

    No memory pattern in low_memory mode: without the arena, the pattern's per-run block of the fused
    step graph (export/lm_fused.py: 2-16 MiB) is above the fixed mmap threshold, so every step mapped
    and unmapped it: 450-680 page faults per decode step and 5.9 instead of 3.7 ms CPU (int4, 1 thread,
    100 cached tokens; docs/design.md, "The fused step graph"). Each intermediate tensor is then
    allocated on its own, from the heap."""
    MEM_PATTERN = False

    def __init__(self, path: Path, num_threads: int, low_memory: bool = True) -> None:
        super().__init__(path, num_threads, low_memory)
        inputs = self.session.get_inputs()
        self._in_dims = {i.name: i.shape for i in inputs}
        self._in_dtypes = {i.name: _ORT_DTYPES.get(i.type) for i in inputs}
        outs = self.session.get_outputs()
        self._out_dims = {o.name: o.shape for o in outs} if all(o.type == _ORT_FLOAT for o in outs) else None
        self._shape_cache: dict[tuple[Any, ...], dict[str, tuple[int, ...]] | None] = {}
        self._default = _OrtStream(self)
        self._streams = _StreamPool(lambda: _OrtStream(self))

    def _output_shapes(self, feed: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]] | None:
        """Output shapes, or None where they cannot be resolved. Cached per input shapes: these repeat
        for a whole KV bucket. Called under the lock."""
        key = tuple((name, np.shape(a)) for name, a in feed.items())
        if key not in self._shape_cache:
            if len(self._shape_cache) > 256:
                self._shape_cache.clear()
            self._shape_cache[key] = self._resolve_shapes(feed)
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
        return self._default.run(feed)


class _OrtStream:
    """One generation's IO binding on an OrtLM: output buffers and bound inputs of its own."""

    stateful = False

    def __init__(self, owner: OrtLM) -> None:
        self.owner = owner
        self._buffers: dict[str, np.ndarray] = {}
        self._binding = owner.session.io_binding()
        self._bound: dict[str, Any] = {}  # input name -> weak reference to the array bound (None: re-bind)
        self._copies: dict[str, np.ndarray] = {}  # inputs bound as converted copies (kept alive here)

    def static_kv_width(self, batch: int) -> int | None:
        return None

    def release(self) -> None:
        """Back to the pool: drop the converted input copies (the rest is re-bound on next use)."""
        self._copies.clear()
        self._bound.clear()

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        owner = self.owner
        with owner._lock:
            shapes = owner._output_shapes(feed) if feed.keys() == owner._in_dims.keys() else None
            if shapes is None:
                return dict(zip(owner.output_names, owner.session.run(owner.output_names, dict(feed))))
            binding = self._binding
            for name in owner.output_names:
                buf = self._buffers.get(name)
                if buf is None or buf.shape != shapes[name]:
                    buf = self._buffers[name] = np.empty(shapes[name], dtype=np.float32)
                    binding.bind_output(name, "cpu", 0, np.float32, buf.shape, buf.ctypes.data)
            for name, a in feed.items():
                ref = self._bound.get(name)
                if ref is not None and ref() is a:
                    continue
                arr = np.ascontiguousarray(a, dtype=owner._in_dtypes[name])
                binding.bind_input(name, "cpu", 0, arr.dtype, arr.shape, arr.ctypes.data)
                if arr is a:  # bound in place: follows the caller's in-place updates
                    self._bound[name] = weakref.ref(a)
                    self._copies.pop(name, None)
                else:  # a converted copy: kept here, and re-bound every call (the original may change)
                    self._bound[name] = None
                    self._copies[name] = arr
            owner.session.run_with_iobinding(binding)
            return dict(self._buffers)


class OrtDecoder(_OrtBase, DecoderBackend):
    """The decoder's worker threads do not spin (busy-wait for more work) after a run: the LM runs
    next, and with as many threads as cores a spinning decoder thread takes a core from it. Measured,
    80M model, 2 threads, streaming first chunk (prefill, 4 decode steps, one decoder window), 4 per
    process, two processes each: fp32 80.0-82.8 ms (min) against 112.9-113.7 ms with spinning (the
    71-token prefill alone: 34 against 40 ms); int8 37.8-38.4 against 56.0-67.9 ms, and int8 one
    sentence per token 4.22-4.41 against 4.74-4.80 ms. The LM keeps spinning: its steps follow
    each other."""

    SPIN = False

    def run(self, hidden: np.ndarray) -> np.ndarray:
        with self._lock:
            return self.session.run(self.output_names[:1], {self.input_names[0]: hidden})[0]


def _port_name(port: Any) -> str:
    """A tensor may carry several names (e.g. the ONNX output name and an internal '/norm/Mul_output_0'):
    prefer the plain, graph-interface one."""
    names = sorted(port.get_names())
    plain = [n for n in names if "/" not in n and ":" not in n]
    return (plain or names or [port.get_any_name()])[0]


_NOTED: set[str] = set()


def openvino_int8_note(model: Any, flags: set[str] | None = None) -> str | None:
    """A performance note for an OpenVINO model with int8 weights on a CPU without integer dot-product
    instructions (cpuinfo.INT8_DOT_FEATURES), else None (also where the CPU's flags are unknown).

    Without them, OpenVINO's CPU plugin computes int8-weight layers in f32, unpacking the weights
    on every call (`FullyConnectedCompressed`, kernel `brgemm_avx2_f32`; its dynamic quantisation
    of activations, DYNAMIC_QUANTIZATION_GROUP_SIZE, had no effect), while ONNX Runtime's int8 runs
    integer products on plain AVX2. Measured on an AVX2-only AMD EPYC (Zen 3), random-80m, 1 thread,
    `scripts/lm_step_latency.py --isolated`: LM 8.99 against 8.01 ms per token (medians of 4 rounds,
    OpenVINO faster in 0 of 4); decoder, 256 tokens: 0.85-0.90 s against 0.40 s. Full int8
    quantisation (nncf.quantize) ran the LM slower still (oneDNN's int8 GEMM, 25 ms per token);
    int4 weights ran as fast as int8; OpenVINO 2024.6 and 2025.2 were no faster."""
    if flags is None:
        flags = read_cpuinfo()[1]
    if not flags or any(f in flags for f in INT8_DOT_FEATURES):
        return None
    int8 = {"i8", "u8"}
    if not any(op.get_type_name() == "Constant" and op.get_element_type().get_type_name() in int8
               for op in model.get_ops()):
        return None
    return ("this model has int8 weights, and this CPU has none of " + ", ".join(INT8_DOT_FEATURES)
            + ": OpenVINO then computes its int8 layers in f32, unpacking the weights on every call, which "
            "was slower than ONNX Runtime's int8 on such a CPU (LM ~12% per token at 1 thread, decoder ~2x). "
            "backend='onnx_cpu' with the ONNX int8 files is likely faster here; fp32 models are not affected.")


def conversion_inference_precision(path: Path) -> str:
    """The OpenVINO inference precision ("f32", "bf16") that the conversion record of a model file names
    ("inference_precision_hint" in the JSON config beside it: <stem>_config.json for an LM,
    <stem>_istft_config.json for a decoder); "f32" where there is no such record."""
    import json

    for suffix in (registry.LM_CONFIG_SUFFIX, registry.DECODER_CONFIG_SUFFIX):
        cfg_path = Path(path).with_name(Path(path).stem + suffix)
        if not cfg_path.is_file():
            continue
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, ValueError):
            continue
        for block in (cfg, cfg.get("onnx") if isinstance(cfg, dict) else None):
            conv = block.get("conversion") if isinstance(block, dict) else None
            if isinstance(conv, dict) and conv.get("inference_precision_hint"):
                return str(conv["inference_precision_hint"])
    return "f32"


def require_bf16(path: Path) -> None:
    """UnsupportedCpuError unless this CPU computes bf16 (pipeline_lib.cpuinfo.BF16_FEATURES): a bf16
    model never silently runs in f32."""
    why = missing_bf16()
    if why is not None:
        raise UnsupportedCpuError(
            f"{path}: converted for bf16 inference, but {why}. Use the fp32 (artifacts/openvino/fp32) or int8 "
            "(artifacts/openvino/int8) model on this machine, or run this one on a CPU with AVX512-BF16 or AMX."
        )


class _OpenVinoBase:
    """Fixes glibc's mmap threshold (fix_malloc_mmap_threshold, process-wide), as ONNX Runtime's
    low_memory mode does, but here for speed: with glibc's dynamic threshold, OpenVINO's per-call
    allocations made decode steps slower. Measured with `soprano-onnx bench`, 80M model, 2 threads,
    256 tokens, alternating runs: int8 4.05 / 4.37 ms per token with the fixed threshold against
    5.66 / 5.43 ms without; fp32 9.63 / 8.84 against 10.39 / 9.42 ms."""

    def __init__(self, path: Path, num_threads: int) -> None:
        fix_malloc_mmap_threshold()
        self._ov = import_openvino("backend 'openvino_cpu'")
        self.path = path
        self._lock = threading.Lock()
        self._core = self._ov.Core()
        self.inference_precision = conversion_inference_precision(path)
        if self.inference_precision == "bf16":
            require_bf16(path)
        self._config = ov_cpu_config(self.inference_precision, threads=num_threads)
        self.model = self._read_model()
        note = openvino_int8_note(self.model)
        if note and note not in _NOTED:  # once per process (the LM and the decoder would repeat it)
            _NOTED.add(note)
            log.warning("%s: %s", path, note)
        self.compiled = self._compile(self.model)
        self.request = self.compiled.create_infer_request()
        self.input_names = [_port_name(p) for p in self.compiled.inputs]
        self.output_names = [_port_name(p) for p in self.compiled.outputs]

    def _read_model(self) -> Any:
        """The model (an IR after checking its .bin: missing, or of another model)."""
        return self._guarded(lambda: load_openvino_model(self.path, self._core) if self.path.suffix == ".xml"
                             else self._core.read_model(str(self.path)))

    def _compile(self, model: Any) -> Any:
        return self._guarded(lambda: self._core.compile_model(model, "CPU", self._config))

    def _guarded(self, step: Callable[[], Any]) -> Any:
        try:
            return step()
        except ModelFileError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ModelFileError(
                f"{self.path}: cannot be loaded by OpenVINO (corrupted or not an ONNX / IR model): "
                f"{str(exc).strip()[:300]}; re-create it: {HOW_TO_PRODUCE}."
            ) from exc


class _BoundRequest:
    """An infer request whose input tensors wrap the fed arrays (shared memory), re-set only when the
    feed brings another array object; outputs are read in place (views of the request's tensors)."""

    def __init__(self, ov: Any, compiled: Any, request: Any | None = None) -> None:
        self._ov, self.compiled = ov, compiled
        self.request = request if request is not None else compiled.create_infer_request()
        self._outputs = [(_port_name(p), p) for p in compiled.outputs]
        self._dtypes = {_port_name(p): p.get_element_type().to_dtype() for p in compiled.inputs}
        self._bound: dict[str, np.ndarray] = {}

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, array in feed.items():
            if self._bound.get(name) is not array:
                array = np.ascontiguousarray(array, dtype=self._dtypes.get(name))
                self.request.set_tensor(name, self._ov.Tensor(array, shared_memory=True))
                self._bound[name] = array
        # start_async + wait rather than infer(): infer() also builds a result dict of every output
        # (~0.35 ms per call with the LM's 36 outputs); the outputs are read here, in place.
        self.request.start_async()
        self.request.wait()
        return {name: self.request.get_tensor(port).data for name, port in self._outputs}


class OpenVinoLM(_OpenVinoBase, LMBackend):
    """The LM step model (plain IR, the KV cache fed as past_* inputs) or the stateful LM (the cache in
    OpenVINO state; `stateful` is True, see pipeline_lib.openvino_stateful): the runtime's choice.

    Plain model: the request's input tensors wrap the fed arrays (shared memory) and are re-set only when the
    feed brings another array object: the generation loop feeds the same KV-cache and mask arrays,
    updated in place, for a whole bucket of steps (see generate.KVCache), so most steps set only
    input_ids and position_ids. An array fed here must therefore not be modified in place except to
    feed it again. Outputs are read in place (views of the request's tensors, valid until the next
    run): when the step model still returned the whole cache, copies of its 34 KV outputs in and out
    made a step ~40% slower (80M LM, fp32, 2 threads: 14.6 vs 10.0 ms at 200 past tokens).

    Static decode model: with dynamic shapes OpenVINO runs shape inference and kernel preparation
    for every node on every call, ~1.3-1.7 ms per step on the 80M LM (2 threads) on top of the
    node time. So one-row decode steps at a cache width of `static_decode_width` columns run on a
    second compilation of the model with every input shape fixed; the generation loop keeps a
    one-row cache at that width (see `static_kv_width`), masked, for as long as it fits. Measured,
    one row at 300 cached tokens: int8 3.6-3.7 ms per step at a fixed width of 576 against 5.0-5.3 ms
    dynamic (ONNX Runtime int8: 3.9-4.1 ms); fp32 8.3-9.6 against 9.4-10.5 ms. Attending to the
    masked columns costs some time in the attention products, which read the whole width: at 250
    used columns, a width of 384 against 640 gave int8 5.06 against 5.26 ms (1 thread) and 4.01
    against 4.35 ms (2 threads), fp32 the same within noise (medians of 8 alternating rounds); the
    OpenVINO profile (int8, 1 thread, 300 used) puts the attention products at 0.62 against 0.98 ms.
    640 is kept so that long sentences (prompt and audio tokens up to 640) stay on the fast model;
    past the width, steps fall back to the dynamic model, 1.3-1.7 ms slower. The cost: the second
    compilation holds its own copy of the weights in the plugin's layouts (RSS after compiling, 80M LM:
    +333 MiB fp32, +189 MiB int8; it compiles a clone of the model already read, so the .bin stays
    mapped once: reading the IR again cost +631 MiB fp32) and takes ~0.6 s, paid on the first one-row
    decode step (the runtime's warm-up). None turns it off.

    The infer requests (and so a stateful model's KV cache) belong to a context (`_OvStream`): one
    default context for `run` / `reset_state`, and one per leased `stream()`. The compiled models
    are shared."""

    STATIC_DECODE_WIDTH = 640  # a prompt of up to 128 tokens and 512 new tokens fit

    def __init__(self, path: Path, num_threads: int, static_decode_width: int | None = STATIC_DECODE_WIDTH) -> None:
        if static_decode_width is not None and (
            isinstance(static_decode_width, bool) or not isinstance(static_decode_width, int) or static_decode_width < 1
        ):
            raise ValueError(f"static_decode_width must be an int >= 1 or None, got {static_decode_width!r}")
        super().__init__(path, num_threads)  # compiles the model: only once the arguments are known good
        # A stateful model (pipeline_lib.openvino_stateful) keeps the KV cache itself: no fixed-width
        # second compilation, the generation loop feeds beam_idx instead of past_* (generate.StateCache).
        self.stateful = bool(self.model.get_sinks())
        self.static_decode_width = None if self.stateful else static_decode_width
        self._static_compiled: Any = None
        self._default = _OvStream(self, self.request)
        self._streams = _StreamPool(lambda: _OvStream(self))

    def static_kv_width(self, batch: int) -> int | None:
        return self.static_decode_width if batch == 1 else None

    def reset_state(self) -> None:
        """Empty a stateful model's KV cache (the default context's): the next call is a prefill."""
        self._default.reset_state()

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._default.run(feed)

    @property
    def _static(self) -> Any:
        """The fixed-shape compilation, once a one-row decode step at the static width has run."""
        return self._static_compiled

    def _static_model(self, width: int) -> Any:
        """The fixed-shape compilation (made on first use; called under the lock)."""
        if self._static_compiled is None:
            # A clone of the model already read: its weights (OpenVINO maps the .bin) are shared
            # with the dynamic compilation; reading the IR again maps them a second time.
            model = self.model.clone()
            fixed = {}
            for port in model.inputs:
                name = _port_name(port)
                if name in ("input_ids", "position_ids"):
                    fixed[port] = [1, 1]
                elif name == "attention_mask":
                    fixed[port] = [1, width + 1]
                else:  # past_*: [batch, kv_heads, past, head_dim]
                    dims = port.get_partial_shape()
                    fixed[port] = [1, dims[1].get_length(), width, dims[3].get_length()]
            self._guarded(lambda: model.reshape(fixed))
            self._static_compiled = self._compile(model)
        return self._static_compiled


class _OvStream:
    """One generation's infer requests on an OpenVinoLM (a stateful model's KV cache lives in the
    dynamic request's state)."""

    def __init__(self, owner: OpenVinoLM, request: Any | None = None) -> None:
        self.owner = owner
        self.stateful = owner.stateful
        self._dynamic = _BoundRequest(owner._ov, owner.compiled, request)
        self._fixed: _BoundRequest | None = None

    def static_kv_width(self, batch: int) -> int | None:
        return self.owner.static_kv_width(batch)

    def release(self) -> None:
        """Back to the pool: let go of the arrays the last generation fed (every input is set
        again on the next run)."""
        for req in (self._dynamic, self._fixed):
            if req is not None:
                req._bound.clear()

    def reset_state(self) -> None:
        with self.owner._lock:
            self._dynamic.request.reset_state()

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        owner = self.owner
        w = owner.static_decode_width
        with owner._lock:
            if w is not None and np.shape(feed["input_ids"]) == (1, 1) and np.shape(feed["attention_mask"]) == (1, w + 1):
                if self._fixed is None:
                    self._fixed = _BoundRequest(owner._ov, owner._static_model(w))
                return self._fixed.run(feed)
            return self._dynamic.run(feed)


class OpenVinoDecoder(_OpenVinoBase, DecoderBackend):
    def run(self, hidden: np.ndarray) -> np.ndarray:
        # share_inputs: no copy of the input; the output is copied out once (the request reuses it).
        with self._lock:
            return self.request.infer({self.input_names[0]: hidden}, share_inputs=True)[self.compiled.outputs[0]]


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
    (see _ort_session); OpenVINO ignores it. static_decode_width: OpenVINO's fixed-shape one-row decode
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
