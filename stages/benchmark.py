"""Stage benchmark: CHECKPOINT_DIR CSV METRICS_JSON ENV_JSON -> one CSV row per backend x precision x threads.

Every configuration the pipeline built (ONNX fp32 from the export stages; every convert.backends x
convert.precisions target of the convert stage, artifacts/<backend>/<precision>), at each of bench.threads, plus the torch
reference at the same thread counts and upstream (soprano-tts, when installed) at `threads`: each in
its own process. Headline figures at `threads` go to METRICS_JSON (DVC metrics); ENV_JSON records
the machine, the library versions and when the sweep ran (pipeline_lib.environment.Environment), for the
report.
"""

import logging
import sys
from pathlib import Path

from pipeline_lib.bench.sweep import Settings, artifact_configs, headline, plan, run_sweep, thread_counts, to_frame
from pipeline_lib.fsutil import atomic_file, write_json
from pipeline_lib.environment import Environment, utc_now
from pipeline_lib.stage import load_params, stage_outputs

log = logging.getLogger("stages.benchmark")


def convert_targets(params):
    """(backend, precision) pairs built: ONNX fp32 (export) + convert.backends x convert.precisions."""
    convert = params.get("convert")
    if convert is None:
        return artifact_configs(None, None)
    return artifact_configs(list(convert.get("backends") or []), list(convert.get("precisions") or []))


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit("usage: python stages/benchmark.py CHECKPOINT_DIR CSV METRICS_JSON ENV_JSON")
    ckpt, csv_path, metrics_path, env_path = (Path(a) for a in sys.argv[1:])
    params = load_params()
    bench = params.bench
    threads = thread_counts(bench.threads)  # OmegaConf resolves "${threads}" here
    settings = Settings(
        num_tokens=int(bench.num_tokens),
        text=bench.text,
        repeats=int(bench.repeats),
        upstream_repeats=int(bench.upstream_repeats),
        warmup_tokens=int(bench.warmup_tokens),
        batch_size=int(bench.batch_size),
        stream=bool(bench.stream),
        timeout_s=float(bench.timeout_s),
        passes=int(bench.get("passes", 1)),
    )
    with stage_outputs("benchmark", csv_path, metrics_path, env_path, keep_previous=True):
        started = utc_now()
        jobs = plan(Path("."), ckpt, threads, convert_targets(params), backends=list(bench.backends),
                    upstream_threads=int(params.threads), pairs=list(bench.get("pairs") or []))
        log.info("benchmark: %d configurations: %s", len(jobs), ", ".join(j.label for j in jobs))
        rows = run_sweep(jobs, settings)  # the previous results stay in place until here (persist: true)
        with atomic_file(csv_path) as tmp:
            to_frame(rows).to_csv(tmp, index=False, float_format="%.6g")
        write_json(metrics_path, headline(rows, int(params.threads)))
        write_json(env_path, Environment.here(date=f"{started} to {utc_now()}", origin="benchmark").to_dict())
        print(to_frame(rows)[["config", "num_tokens", "wall_s", "audio_s", "rtf", "xrt", "speedup_vs_torch",
                              "first_chunk_ms", "peak_rss_mb"]].to_string(index=False))
