"""Stage serve_bench: CHECKPOINT_DIR MODEL_DIR CSV OPEN_CSV PLOT METRICS_JSON -> the server under load.

Our server (`soprano-onnx serve --model MODEL_DIR`) and upstream's (`soprano.server` on CHECKPOINT_DIR,
when soprano-tts is installed), each in its own process with `serve_bench.threads` threads, one after the other
(pipeline_lib.bench.serve_load):
- closed loop: ours under each of serve_bench.clients concurrent clients, upstream under each of
  serve_bench.upstream_clients: one CSV row per server x level, and the plot (x real time and p95 time to
  first audio against clients);
- open loop, ours only (upstream's server is serial): Poisson arrivals offering each of
  serve_bench.open_streams real-time streams, texts of mixed length: one OPEN_CSV row per rate;
- headline metrics, with our server's capacity.
max_new_tokens is fixed per sentence (random weights never emit [STOP]).
"""

import dataclasses
import logging
import sys
import tempfile
from pathlib import Path

from pipeline_lib.bench.serve_load import (
    CLOSED_PRINT,
    OPEN_COLUMNS,
    OPEN_PRINT,
    UPSTREAM,
    AudioGeometry,
    LoadSettings,
    OpenLoopSettings,
    capacity_line,
    headline,
    ours_spec,
    plot_serve,
    rates_for_streams,
    run_benchmark,
    to_frame,
    upstream_spec,
)
from pipeline_lib.bench.sweep import upstream_available
from pipeline_lib.fsutil import atomic_file, write_json
from pipeline_lib.stage import load_params, stage_outputs

log = logging.getLogger("stages.serve_bench")

if __name__ == "__main__":
    if len(sys.argv) != 7:
        sys.exit("usage: python stages/serve_bench.py CHECKPOINT_DIR MODEL_DIR CSV OPEN_CSV PLOT METRICS_JSON")
    ckpt, model, csv_path, open_csv_path, plot_path, metrics_path = (Path(a) for a in sys.argv[1:])
    params = load_params()
    cfg = params.serve_bench
    threads = int(cfg.threads)
    with stage_outputs("serve_bench", csv_path, open_csv_path, plot_path, metrics_path):
        logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
        geometry = AudioGeometry.from_model_dir(model)
        settings = LoadSettings(clients=tuple(int(c) for c in cfg.clients), max_requests=int(cfg.max_requests),
                                level_s=float(cfg.level_s), drain_s=float(cfg.drain_s),
                                max_new_tokens=int(cfg.max_new_tokens), warmup_requests=int(cfg.warmup_requests),
                                idle_timeout_s=float(cfg.idle_timeout_s))
        probe = OpenLoopSettings(rates=(1.0,), level_s=float(cfg.open_level_s), drain_s=float(cfg.open_drain_s),
                                 long_share=float(cfg.open_long_share), seed=int(cfg.open_seed),
                                 max_new_tokens=settings.max_new_tokens, warmup_requests=settings.warmup_requests,
                                 idle_timeout_s=settings.idle_timeout_s)
        open_settings = dataclasses.replace(
            probe, rates=rates_for_streams([float(s) for s in cfg.open_streams], probe, geometry))
        specs = [ours_spec(model, threads, str(cfg.backend), response_format=str(cfg.response_format),
                           max_batch=int(cfg.max_batch), max_queue=int(cfg.max_queue))]
        if bool(cfg.upstream) and upstream_available():
            specs.append(upstream_spec(ckpt, threads, settings.max_new_tokens))
        elif bool(cfg.upstream):
            log.warning("serve_bench: soprano-tts is not installed; upstream's server is left out")
        upstream = dataclasses.replace(settings, clients=tuple(int(c) for c in cfg.upstream_clients),
                                       level_s=float(cfg.upstream_level_s), drain_s=float(cfg.upstream_drain_s))
        with tempfile.TemporaryDirectory(prefix="soprano-serve-") as logs:
            rows, open_rows = run_benchmark(specs, settings, geometry, Path(logs), {UPSTREAM: upstream}, open_settings)
        with atomic_file(csv_path) as tmp:
            to_frame(rows).to_csv(tmp, index=False, float_format="%.6g")
        with atomic_file(open_csv_path) as tmp:
            to_frame(open_rows, OPEN_COLUMNS).to_csv(tmp, index=False, float_format="%.6g")
        with atomic_file(plot_path) as tmp:
            plot_serve(rows, tmp)
        write_json(metrics_path, headline(rows, open_rows))
        print(to_frame(rows)[CLOSED_PRINT].to_string(index=False))
        print(to_frame(open_rows, OPEN_COLUMNS)[OPEN_PRINT].to_string(index=False))
        print(capacity_line(open_rows))
