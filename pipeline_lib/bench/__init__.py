"""Benchmarks: one configuration in-process (`measure`, on its backend's `engines`), many in fresh processes (`sweep`).

`soprano-onnx bench` (pipeline_lib.bench.command) measures one configuration; the DVC `benchmark`
stage sweeps every backend x precision x thread count and writes one tidy CSV row per configuration.
The server load benchmark (`serve_bench` stage) is `serve_load` and its pieces: `serve_request`,
`serve_process`, `serve_drivers` (closed and open loops), `serve_summary` and `capacity`.
"""

from __future__ import annotations

from pipeline_lib.registry import PRECISIONS  # here too for readers of pipeline_lib.bench.PRECISIONS (the server)

__all__ = ["COLUMNS", "PRECISIONS"]

# The columns of one benchmark row, in CSV order. Times in seconds unless the name says ms / mb.
COLUMNS = (
    "config",               # backend-precision-tN: a unique label
    "backend",              # registry.BENCH_BACKENDS: onnx | openvino | torch | upstream
    "precision",            # registry.PRECISIONS: fp32 | int8
    "threads",
    "max_new_tokens",       # the requested (fixed) token count
    "num_tokens",           # tokens actually generated per synthesis (median over repeats)
    "stop_emitted",         # 1 when the model ended with [STOP] before max_new_tokens
    "repeats",
    "load_s",               # constructing the engine (sessions / compiled models / weights)
    "prefill_s",            # LM over the prompt
    "per_token_median_ms",  # one LM decode step
    "per_token_p90_ms",
    "decode_s",             # all LM decode steps (lm_s - prefill_s)
    "lm_s",                 # prefill + decode
    "decoder_s",            # hidden states -> spectrum (upstream: -> audio, ISTFT included)
    "istft_s",              # spectrum -> audio
    "other_s",              # wall - lm - decoder - istft: text front end, tokenizer, glue
    "audio_s",              # seconds of audio produced
    "wall_s",               # end-to-end synthesize() call
    "rtf",                  # wall_s / audio_s (< 1: faster than real time)
    "xrt",                  # audio_s / wall_s (x real time)
    "first_chunk_ms",       # streaming: call to first audio chunk
    "batch_size",           # texts in the batch measurement
    "batch_audio_s",
    "batch_wall_s",
    "batch8_xrt",           # audio / wall of the batch measurement (8 sentences by default)
    "peak_rss_mb",          # peak resident memory of the benchmark process
    "load_avg",             # 1-minute load average when the configuration started (> threads: a busy machine)
    "speedup_vs_torch",     # xrt / xrt of the torch reference at the same thread count (sweep)
    "speedup_vs_fp32",      # xrt / xrt of fp32 of the same backend and threads (sweep)
    "note",
)


def row_names(backend: str, precision: str, decoder_backend: str | None = None,
              decoder_precision: str | None = None) -> tuple[str, str, str]:
    """(config without threads, backend column, precision column) of a benchmark row. A decoder of another
    backend or precision (a registry.Choice pair) gives "<lm target>+<decoder target>", "<lm>+<decoder>"
    backends and "<lm>+<decoder>" precisions where they differ; None: the LM's."""
    dec_b, dec_p = decoder_backend or backend, decoder_precision or precision
    if (dec_b, dec_p) == (backend, precision):
        return f"{backend}-{precision}", backend, precision
    return (f"{backend}-{precision}+{dec_b}-{dec_p}", backend if dec_b == backend else f"{backend}+{dec_b}",
            precision if dec_p == precision else f"{precision}+{dec_p}")
