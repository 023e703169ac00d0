"""Many benchmark configurations, each in its own process, into one tidy table.

Each configuration runs as `python -m pipeline_lib.cli bench ... --json FILE` in a fresh process, so the
peak RSS is that configuration's own and thread pools (ONNX Runtime, OpenVINO, torch, OpenMP) start
clean with the requested thread count.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from pipeline_lib import registry
from pipeline_lib.bench import COLUMNS, row_names
from pipeline_lib.errors import SopranoOnnxError
from pipeline_lib.registry import BENCH_BACKENDS, DECODER_DIR, EXPORT_TARGET, LM_DIR

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """One configuration: what to run and on which files."""

    backend: str
    precision: str
    threads: int
    lm: Path
    decoder: Path | None = None
    optional: bool = False  # a failure becomes a row with a note instead of an error (the upstream oracle)
    skip: str | None = None  # not run on this machine: a row of NaN with this note (bf16 without bf16 flags)
    # A pair (registry.Choice): the decoder's target where it differs from the LM's; None: the LM's.
    decoder_backend: str | None = None
    decoder_precision: str | None = None

    @property
    def pair(self) -> bool:
        return self.decoder_backend is not None or self.decoder_precision is not None

    @property
    def label(self) -> str:
        return f"{self.names[0]}-t{self.threads}"

    @property
    def names(self) -> tuple[str, str, str]:
        """(config without threads, backend column, precision column), as measure.summarize writes them."""
        return row_names(self.backend, self.precision, self.decoder_backend, self.decoder_precision)


@dataclass(frozen=True)
class Settings:
    """What every configuration of a sweep shares."""

    num_tokens: int = 128
    text: str | None = None
    repeats: int = 3
    upstream_repeats: int = 1
    warmup_tokens: int = 16
    batch_size: int = 8
    stream: bool = True
    timeout_s: float = 900.0
    passes: int = 1  # sweeps over all configurations, alternating order; see merge_passes


def thread_counts(values: Iterable[Any]) -> list[int]:
    """Thread counts as ints, in order, without duplicates (1 and ${threads} may be equal)."""
    out: list[int] = []
    for v in values:
        n = int(v)
        if n < 1:
            raise SopranoOnnxError(f"bench.threads: thread counts must be >= 1, got {v!r}")
        if n not in out:
            out.append(n)
    if not out:
        raise SopranoOnnxError("bench.threads is empty: list at least one thread count, e.g. [1, ${threads}]")
    return out


def model_dirs(root: Path, backend: str, precision: str) -> tuple[Path, Path]:
    """(LM folder, decoder folder) of an exported / converted backend x precision: the first of its
    base folders (registry.model_folders) holding both (the first when none does, for the error message)."""
    bases = [Path(root) / b for b in registry.model_folders(backend, precision)]
    for base in bases:
        if (base / LM_DIR).is_dir() and (base / DECODER_DIR).is_dir():
            return base / LM_DIR, base / DECODER_DIR
    return bases[0] / LM_DIR, bases[0] / DECODER_DIR


def artifact_configs(backends: Sequence[str] | None, precisions: Sequence[str] | None) -> list[tuple[str, str]]:
    """The (backend, precision) pairs the pipeline builds: ONNX fp32 always (the export stages), then
    every convert.backends x convert.precisions target of the convert stage that the registry has (no
    onnx-bf16; None: no convert stage)."""
    pairs = [EXPORT_TARGET]
    pairs += [(str(b), str(p)) for b in backends or () for p in precisions or () if (str(b), str(p)) in registry.TARGETS]
    return list(dict.fromkeys(pairs))


def plan(
    root: Path,
    checkpoint_dir: Path,
    threads: Sequence[int],
    targets: Sequence[tuple[str, str]] = (EXPORT_TARGET,),
    backends: Sequence[str] = BENCH_BACKENDS,
    upstream_threads: int | None = None,
    pairs: Sequence[str] = (),
    pair_threads: int | None = None,
) -> list[Job]:
    """Every configuration of the benchmark stage: each (backend, precision) of `targets` (see
    artifact_configs) whose backend is in `backends`, at every thread count (a missing artifact is an
    error), the torch reference at every thread count, and upstream once, at `upstream_threads`
    (default: the last thread count), when installed (its generate() is held to num_tokens, token for
    token with ours, and it is slow, so it runs once). `pairs`: registry.Choice labels of an LM and a decoder
    from different targets ("onnx-int4+openvino-int8"), each at `pair_threads` (default: the last thread
    count), from the targets' folders under root (a missing one is an error)."""
    ckpt = Path(checkpoint_dir)
    jobs: list[Job] = []
    for backend, precision in targets:
        if backend not in backends:
            continue
        lm, dec = model_dirs(root, backend, precision)
        missing = [str(p) for p in (lm, dec) if not p.is_dir()]
        if missing:
            build = "export_lm export_decoder" if (backend, precision) == EXPORT_TARGET else f"convert@{backend}-{precision}"
            raise SopranoOnnxError(
                f"benchmark of {backend} {precision}: {', '.join(missing)} not found; build it first (dvc repro {build})."
            )
        counts = threads if precision in FULL_SWEEP_PRECISIONS else list(threads)[-1:]
        skip = skip_reason(backend, precision)
        jobs += [Job(backend, precision, n, lm, dec, skip=skip) for n in counts]
    for label in pairs:
        c = registry.choice(label)
        lm, _ = model_dirs(root, c.lm.backend, c.lm.precision)
        _, dec = model_dirs(root, c.decoder.backend, c.decoder.precision)
        missing = [str(p) for p in (lm, dec) if not p.is_dir()]
        if missing:
            raise SopranoOnnxError(f"benchmark of {c.label} (bench.pairs): {', '.join(missing)} not found; build it "
                                   f"first (dvc repro {' '.join('convert@' + t.label for t in c.targets)}).")
        skip = skip_reason(c.lm.backend, c.lm.precision) or skip_reason(c.decoder.backend, c.decoder.precision)
        jobs.append(Job(c.lm.backend, c.lm.precision, int(pair_threads or threads[-1]), lm, dec, skip=skip,
                        decoder_backend=c.decoder.backend, decoder_precision=c.decoder.precision))
    if "torch" in backends:
        jobs += [Job("torch", "fp32", n, ckpt, ckpt / "decoder.pth") for n in threads]
    if "upstream" in backends and upstream_available():
        jobs.append(Job("upstream", "fp32", int(upstream_threads or threads[-1]), ckpt, optional=True))
    return jobs


# Precisions benchmarked at every bench.threads count; the others (bf16, int4) only at the last (`threads`),
# which keeps the benchmark stage's added time to 2 configurations x 3 passes (~2 minutes on 2 cores).
FULL_SWEEP_PRECISIONS = ("fp32", "int8")


def skip_reason(backend: str, precision: str) -> str | None:
    """Why a target cannot be benchmarked on this machine (a bf16 model without bf16 CPU flags), or None."""
    if registry.precision(precision).inference == "bf16":
        from pipeline_lib.cpuinfo import missing_bf16

        why = missing_bf16()
        if why:
            return f"skipped: {why}"
    return None


def upstream_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("soprano") is not None


def job_argv(job: Job, settings: Settings, json_path: Path) -> list[str]:
    argv = [sys.executable, "-m", "pipeline_lib.cli", "bench", "--backend", job.backend, "--lm", str(job.lm),
            "--precision", job.precision, "--num_threads", str(job.threads), "--num_tokens", str(settings.num_tokens),
            "--repeats", str(settings.upstream_repeats if job.backend == "upstream" else settings.repeats),
            "--warmup_tokens", str(settings.warmup_tokens), "--batch", str(settings.batch_size), "--json", str(json_path)]
    if job.decoder is not None:
        argv += ["--decoder", str(job.decoder)]
    if job.pair:
        argv += ["--decoder_backend", job.decoder_backend or job.backend,
                 "--decoder_precision", job.decoder_precision or job.precision]
    if settings.text:
        argv += ["--text", settings.text]
    if not settings.stream:
        argv.append("--no_stream")
    return argv


def job_env(threads: int) -> dict[str, str]:
    """The environment of one configuration: OpenMP / BLAS pools sized like the engine's own."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def run_job(job: Job, settings: Settings, workdir: Path) -> dict[str, Any]:
    """Run one configuration in a fresh process; its JSON row (NaN for nulls)."""
    json_path = workdir / f"{job.label}.json"
    if job.skip:
        log.warning("bench %s %s", job.label, job.skip)
        row = {c: math.nan for c in COLUMNS}
        row.update(config=job.label, backend=job.names[1], precision=job.names[2], threads=job.threads, note=job.skip)
        return row
    argv = job_argv(job, settings, json_path)
    log.info("bench %s", job.label)
    start = time.perf_counter()
    try:
        proc = subprocess.run(argv, env=job_env(job.threads), capture_output=True, text=True,
                              timeout=settings.timeout_s)
        failure = None if proc.returncode == 0 else f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-2000:]}"
    except subprocess.TimeoutExpired:
        failure = f"timed out after {settings.timeout_s:.0f} s"
    if failure is None and not json_path.is_file():
        failure = f"no result written to {json_path}"
    if failure is not None:
        if job.optional:
            log.warning("bench %s failed (optional, kept as a note): %s", job.label, failure)
            row = {c: math.nan for c in COLUMNS}
            row.update(config=job.label, backend=job.names[1], precision=job.names[2], threads=job.threads,
                       note=f"failed: {failure.splitlines()[-1] if failure.strip() else failure}")
            return row
        raise SopranoOnnxError(f"benchmark {job.label} failed ({' '.join(argv)}): {failure}")
    row = {k: (math.nan if v is None else v) for k, v in json.loads(json_path.read_text()).items()}
    log.info("bench %s: x%.2f real time, %.1f s in its process", job.label, row["xrt"], time.perf_counter() - start)
    return row


def add_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """speedup_vs_torch (xrt over the torch reference at the same threads) and speedup_vs_fp32."""
    torch_xrt = {r["threads"]: r["xrt"] for r in rows if r["backend"] == "torch"}
    fp32_xrt = {(r["backend"], r["threads"]): r["xrt"] for r in rows if r["precision"] == "fp32"}
    for r in rows:
        t = torch_xrt.get(r["threads"], math.nan)
        f = fp32_xrt.get((r["backend"], r["threads"]), math.nan)
        r["speedup_vs_torch"] = r["xrt"] / t if t and not math.isnan(t) else math.nan
        r["speedup_vs_fp32"] = r["xrt"] / f if f and not math.isnan(f) else math.nan
    return rows


def run_sweep(jobs: Sequence[Job], settings: Settings) -> list[dict[str, Any]]:
    """Every job in its own process, in order (with several passes: forward, then backward, and so on,
    so that no configuration always runs at the same point of the sweep); one row per job (see
    merge_passes), with the ratio columns filled in."""
    if not jobs:
        raise SopranoOnnxError("nothing to benchmark: no configurations were planned")
    passes = int(settings.passes)
    if passes < 1:
        raise SopranoOnnxError(f"bench passes must be >= 1, got {passes}")
    runs: dict[str, list[dict[str, Any]]] = {job.label: [] for job in jobs}
    with tempfile.TemporaryDirectory(prefix="soprano-bench-") as work:
        for p in range(passes):
            order = list(jobs) if p % 2 == 0 else list(reversed(jobs))
            if passes > 1:
                log.info("bench pass %d of %d", p + 1, passes)
            for job in order:
                runs[job.label].append(run_job(job, settings, Path(work)))
    return add_ratios([merge_passes(runs[job.label]) for job in jobs])


def merge_passes(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One configuration's rows from several passes -> one row: the pass with the highest x real time
    (its per-stage times come with it), the lowest first-chunk latency and the highest batch x real
    time of any pass (each a best-of-N, as interference from other work on the machine only ever
    slows a run down), and the highest peak RSS (the worst case). One row: returned as it is."""
    if len(rows) == 1:
        return dict(rows[0])

    def value(r: dict[str, Any], key: str) -> float:
        v = r.get(key, math.nan)
        return math.nan if v is None else float(v)

    def pick(key: str, best: Any) -> dict[str, Any] | None:
        have = [r for r in rows if not math.isnan(value(r, key))]
        return best(have, key=lambda r: value(r, key)) if have else None

    out = dict(pick("xrt", max) or rows[0])
    chunk = pick("first_chunk_ms", min)
    if chunk is not None:
        out["first_chunk_ms"] = chunk["first_chunk_ms"]
    batch = pick("batch8_xrt", max)
    if batch is not None:
        for key in ("batch8_xrt", "batch_audio_s", "batch_wall_s"):
            if key in batch:
                out[key] = batch[key]
    rss = pick("peak_rss_mb", max)
    if rss is not None:
        out["peak_rss_mb"] = rss["peak_rss_mb"]
    note = str(out.get("note") or "")
    out["note"] = f"{note}; best of {len(rows)} passes" if note else f"best of {len(rows)} passes"
    return out


def to_frame(rows: Sequence[dict[str, Any]]):
    """Rows as a pandas DataFrame with exactly COLUMNS, in order."""
    import pandas as pd

    return pd.DataFrame([{c: r.get(c, math.nan) for c in COLUMNS} for r in rows], columns=list(COLUMNS))


def headline(rows: Sequence[dict[str, Any]], threads: int) -> dict[str, Any]:
    """The DVC metrics: figures at `threads` per configuration, best per backend, int8 speedups."""

    def clean(v: Any) -> Any:
        return None if isinstance(v, float) and math.isnan(v) else (round(v, 4) if isinstance(v, float) else v)

    at = [r for r in rows if int(r["threads"]) == int(threads)]
    by_config = {f"{r['backend']}_{r['precision']}": r for r in at}
    fixed = [r["max_new_tokens"] for r in rows if r["backend"] != "upstream"
             and not (isinstance(r.get("max_new_tokens"), float) and math.isnan(r["max_new_tokens"]))]  # skipped rows: NaN
    metrics: dict[str, Any] = {"threads": int(threads), "num_tokens": int(fixed[0]) if fixed else None}
    for key in ("xrt", "rtf", "speedup_vs_torch", "per_token_median_ms", "first_chunk_ms", "batch8_xrt", "peak_rss_mb"):
        metrics[key] = {name: clean(r[key]) for name, r in by_config.items()}
    best: dict[str, Any] = {}
    for r in at:
        if isinstance(r["xrt"], float) and math.isnan(r["xrt"]):
            continue
        if r["backend"] not in best or r["xrt"] > best[r["backend"]]:
            best[r["backend"]] = r["xrt"]
    metrics["best_xrt"] = {b: clean(v) for b, v in best.items()}
    metrics["int8_speedup"] = {r["backend"]: clean(r["speedup_vs_fp32"]) for r in at if r["precision"] == "int8"}
    return metrics
