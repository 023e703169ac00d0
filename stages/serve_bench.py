"""Stage serve_bench: CHECKPOINT_DIR MODEL_DIR CSV PLOT METRICS_JSON -> the server under load.

Our server (`soprano-onnx serve --model MODEL_DIR`) and upstream's (`soprano.server` on CHECKPOINT_DIR,
when soprano-tts is installed), each in its own process with `serve_bench.threads` threads, one after the other,
under each of serve_bench.clients concurrent clients (pipeline_lib.bench.serve_load): one CSV row per
server x level, the plot (x real time and p95 time to first audio against clients) and headline
metrics. max_new_tokens is fixed per sentence (random weights never emit [STOP]).
"""

import dataclasses
import logging
import sys
import tempfile
from pathlib import Path

from pipeline_lib.bench.serve_load import (
    UPSTREAM,
    AudioGeometry,
    LoadSettings,
    headline,
    ours_spec,
    plot_serve,
    run_benchmark,
    to_frame,
    upstream_spec,
)
from pipeline_lib.bench.sweep import upstream_available
from pipeline_lib.fsutil import atomic_file, write_json
from pipeline_lib.stage import load_params, stage_outputs

log = logging.getLogger("stages.serve_bench")

if __name__ == "__main__":
    if len(sys.argv) != 6:
        sys.exit("usage: python stages/serve_bench.py CHECKPOINT_DIR MODEL_DIR CSV PLOT METRICS_JSON")
    ckpt, model, csv_path, plot_path, metrics_path = (Path(a) for a in sys.argv[1:])
    params = load_params()
    cfg = params.serve_bench
    threads = int(cfg.threads)
    with stage_outputs("serve_bench", csv_path, plot_path, metrics_path):
        logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
        settings = LoadSettings(clients=tuple(int(c) for c in cfg.clients), max_requests=int(cfg.max_requests),
                                level_s=float(cfg.level_s), drain_s=float(cfg.drain_s),
                                max_new_tokens=int(cfg.max_new_tokens), warmup_requests=int(cfg.warmup_requests),
                                idle_timeout_s=float(cfg.idle_timeout_s))
        specs = [ours_spec(model, threads, str(cfg.backend), response_format=str(cfg.response_format),
                           max_batch=int(cfg.max_batch), max_queue=int(cfg.max_queue))]
        if bool(cfg.upstream) and upstream_available():
            specs.append(upstream_spec(ckpt, threads, settings.max_new_tokens))
        elif bool(cfg.upstream):
            log.warning("serve_bench: soprano-tts is not installed; upstream's server is left out")
        upstream = dataclasses.replace(settings, level_s=float(cfg.upstream_level_s),
                                       drain_s=float(cfg.upstream_drain_s))
        with tempfile.TemporaryDirectory(prefix="soprano-serve-") as logs:
            rows = run_benchmark(specs, settings, AudioGeometry.from_model_dir(model), Path(logs), {UPSTREAM: upstream})
        with atomic_file(csv_path) as tmp:
            to_frame(rows).to_csv(tmp, index=False, float_format="%.6g")
        with atomic_file(plot_path) as tmp:
            plot_serve(rows, tmp)
        write_json(metrics_path, headline(rows))
        print(to_frame(rows)[["server", "clients", "requests_ok", "errors", "cut", "xrt", "ttfa_p50_ms", "ttfa_p95_ms",
                              "latency_p95_ms"]].to_string(index=False))
