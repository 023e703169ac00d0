"""ONNX Runtime's backends: `OrtLM` (one IO binding per stream, output buffers reused) and `OrtDecoder`,
and the session settings both use (`ort_session`). The contract is runtime.backends'."""

from __future__ import annotations

import threading
import weakref
from itertools import compress
from operator import is_not, methodcaller
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pipeline_lib.errors import MissingBackendError, ModelFileError
from pipeline_lib.runtime.backend_base import (
    HOW_TO_PRODUCE,
    DecoderBackend,
    LMBackend,
    _StreamPool,
    fix_malloc_mmap_threshold,
)


def _import_ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise MissingBackendError(
            "backend 'onnx_cpu' needs onnxruntime, which is not installed: pip install onnxruntime"
        ) from exc
    return ort


def ort_session(path: Path, num_threads: int, low_memory: bool = True, spin: bool = True,
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
        self.session = ort_session(path, num_threads, low_memory, self.SPIN, self.MEM_PATTERN or not low_memory)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]


# Inputs this small (the step's input_ids / position_ids) are copied into a buffer the binding keeps,
# bound once per shape, instead of being bound anew each call (a new array object every step).
STAGED_INPUT_BYTES = 1024
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
    of steps. Small inputs (up to STAGED_INPUT_BYTES: input_ids, position_ids, a mask of up to 128
    columns, a prompt's empty caches) are copied into buffers of this object's, bound once per shape,
    so most steps bind nothing, and a step whose feed repeats the last binding skips the binding
    altogether (`_OrtStream._refill`). Binding all 37 inputs each
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
    allocated on its own, from the heap.

    A model whose present_X outputs go with past_X inputs (the fused graph's shared KV buffers,
    registry.KV_CACHE_BUFFER) has each present_X bound to the fed past_X array: the model writes the
    step's keys and values into the caller's buffer (runtime.kv_cache). Such an input must be fed as a
    C-contiguous float32 array (or view)."""
    MEM_PATTERN = False

    def __init__(self, path: Path, num_threads: int, low_memory: bool = True) -> None:
        super().__init__(path, num_threads, low_memory)
        inputs = self.session.get_inputs()
        self._in_dims = {i.name: i.shape for i in inputs}
        self._in_dtypes = {i.name: _ORT_DTYPES.get(i.type) for i in inputs}
        outs = self.session.get_outputs()
        self._out_dims = {o.name: o.shape for o in outs} if all(o.type == _ORT_FLOAT for o in outs) else None
        self._shape_cache: dict[tuple[Any, ...], dict[str, tuple[int, ...]] | None] = {}
        # In-place KV buffers (registry.KV_CACHE_BUFFER): output present_X is bound to input past_X's memory.
        self._alias = {f"past_{n[len('present_'):]}": n for n in self.output_names
                       if n.startswith("present_") and f"past_{n[len('present_'):]}" in self._in_dims}
        self._alias_pairs = tuple(self._alias.items())
        self._own_outputs = tuple(n for n in self.output_names if n not in self._alias.values())
        self._default = _OrtStream(self)
        self._streams = _StreamPool(lambda: _OrtStream(self))

    def _output_shapes(self, feed: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]] | None:
        """Output shapes, or None where they cannot be resolved. Cached per input shapes: these repeat
        for a whole KV bucket. Called under the lock."""
        key = (tuple(feed), tuple([a.shape if type(a) is np.ndarray else np.shape(a) for a in feed.values()]))
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
        self._staged: dict[str, np.ndarray] = {}  # small inputs: a buffer of ours, bound once, refilled per call
        # The last full binding, for `_refill`: (input names in feed order, per input the weak reference to
        # the array bound by address, or _unbound for a staged input); None: run the full path.
        self._layout: tuple[tuple[str, ...], tuple[Any, ...]] | None = None

    def static_kv_width(self, batch: int) -> int | None:
        return None

    def release(self) -> None:
        """Back to the pool: drop the converted input copies and forget the inputs bound by address
        (re-bound on next use). The staged inputs and the output buffers stay bound: they are ours."""
        self._copies.clear()
        self._bound.clear()
        self._layout = None

    def _refill(self, feed: Mapping[str, np.ndarray]) -> bool:
        """The per-step path: True when the feed names the inputs of the last full binding in the same
        order, each input bound by address is the same array object as then, and each other one is staged
        with the same shape and dtype (copied in here). The output shapes are then unchanged too. False:
        the full path binds what changed (staged inputs may have been refilled: harmless)."""
        layout = self._layout
        if layout is None or tuple(feed) != layout[0]:
            return False
        staged = self._staged
        for name in compress(layout[0], map(is_not, feed.values(), map(_deref, layout[1]))):
            a, stage = feed[name], staged.get(name)
            if stage is None or type(a) is not np.ndarray or a.shape != stage.shape or a.dtype != stage.dtype:
                return False
            np.copyto(stage, a)
        return True

    def _outputs(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = dict(self._buffers)
        for past, present in self.owner._alias_pairs:
            out[present] = feed[past]
        return out

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        owner = self.owner
        with owner._lock:
            if self._refill(feed):
                owner.session.run_with_iobinding(self._binding)
                return self._outputs(feed)
            self._layout = None
            shapes = owner._output_shapes(feed) if feed.keys() == owner._in_dims.keys() else None
            if shapes is None:
                out = dict(zip(owner.output_names, owner.session.run(owner.output_names, dict(feed))))
                for past, present in owner._alias.items():  # the in-place contract, by copy
                    if past in feed:
                        feed[past][...] = out[present]
                        out[present] = feed[past]
                return out
            binding = self._binding
            aliases = owner._alias
            buffers = self._buffers
            for name in owner._own_outputs:
                buf = buffers.get(name)
                if buf is None or buf.shape != shapes[name]:
                    buf = buffers[name] = np.empty(shapes[name], dtype=np.float32)
                    binding.bind_output(name, "cpu", 0, np.float32, buf.shape, buf.ctypes.data)
            bound, staged = self._bound, self._staged
            for name, a in feed.items():
                ref = bound.get(name)
                if ref is not None and ref() is a:
                    continue
                stage = staged.get(name)
                if stage is not None and type(a) is np.ndarray and a.shape == stage.shape and a.dtype == stage.dtype:
                    np.copyto(stage, a)  # a small input: copied into the buffer bound for it
                    continue
                arr = np.ascontiguousarray(a, dtype=owner._in_dtypes[name])
                if name in aliases and arr is not a:  # before any binding: the old one stays valid
                    raise ValueError(f"{name}: an in-place KV buffer must be a C-contiguous float32 array")
                if name not in aliases and arr.nbytes <= STAGED_INPUT_BYTES:
                    stage = staged[name] = arr.copy()
                    binding.bind_input(name, "cpu", 0, stage.dtype, stage.shape, stage.ctypes.data)
                    bound[name] = None
                    self._copies.pop(name, None)
                    continue
                binding.bind_input(name, "cpu", 0, arr.dtype, arr.shape, arr.ctypes.data)
                staged.pop(name, None)  # bound to another buffer now: its stage is no longer what runs
                if name in aliases:
                    binding.bind_output(aliases[name], "cpu", 0, arr.dtype, arr.shape, arr.ctypes.data)
                if arr is a:  # bound in place: follows the caller's in-place updates
                    bound[name] = weakref.ref(a)
                    self._copies.pop(name, None)
                else:  # a converted copy: kept here, and re-bound every call (the original may change)
                    bound[name] = None
                    self._copies[name] = arr
            owner.session.run_with_iobinding(binding)
            if not self._copies:
                self._layout = (tuple(feed), tuple(bound.get(name) or _unbound for name in feed))
            return self._outputs(feed)


_deref = methodcaller("__call__")  # a weak reference's referent (operator.call is Python 3.11+)


def _unbound() -> None:
    """Stands for a staged input's weak reference in `_OrtStream._layout` (no array bound by address)."""
    return None


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
