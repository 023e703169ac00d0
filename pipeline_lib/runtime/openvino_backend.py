"""OpenVINO's backends: `OpenVinoLM` (stateful or step IR, an optional fixed-shape one-row decode model)
and `OpenVinoDecoder`, and the checks before compiling (bf16 support, the int8 note). The contract is
runtime.backends'."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from pipeline_lib import registry
from pipeline_lib.cpuinfo import INT8_DOT_FEATURES, missing_bf16, read_cpuinfo
from pipeline_lib.errors import ModelFileError, UnsupportedCpuError
from pipeline_lib.openvino_ir import import_openvino, load_openvino_model, ov_cpu_config
from pipeline_lib.runtime.backend_base import (
    HOW_TO_PRODUCE,
    DecoderBackend,
    LMBackend,
    _StreamPool,
    fix_malloc_mmap_threshold,
)

log = logging.getLogger(__name__)


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
