"""Stage report: SOURCE_JSON BENCH_CSV BENCH_METRICS OUT_DIR [--parity JSON ...] [--convert JSON ...]
[--env BENCH_ENV_JSON] [--serve SERVE_CSV] [--serve-open SERVE_OPEN_CSV] [--peer PEER_JSON] -> OUT_DIR/report.md, OUT_DIR/xrt_by_backend.png, OUT_DIR/stage_breakdown.png.

Every number in the report comes from these inputs (one run's CSV and metrics); the machine, the
library versions and the date come from the benchmark's environment record (--env), not from where
the report is built.
"""

import argparse
from pathlib import Path

from pipeline_lib.report import BREAKDOWN_PNG, XRT_PNG, build_report
from pipeline_lib.stage import stage_outputs

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("source", type=Path, help="the checkpoint's source.json")
    p.add_argument("bench_csv", type=Path)
    p.add_argument("bench_metrics", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--parity", type=Path, nargs="*", default=[], help="parity metric files ({model: {metric: value}})")
    p.add_argument("--convert", type=Path, nargs="*", default=[], help="conversion metric files ({target: {figure: value}})")
    p.add_argument("--env", type=Path, default=None, help="the benchmark's environment record (bench_env.json)")
    p.add_argument("--serve", type=Path, default=None, help="the server load benchmark's CSV (serve.csv)")
    p.add_argument("--serve-open", dest="serve_open", type=Path, default=None,
                   help="the server load benchmark's open-loop CSV (serve_open.csv)")
    p.add_argument("--peer", type=Path, default=None, help="the peer stage's metrics (peer.json)")
    a = p.parse_args()
    with stage_outputs("report", a.out_dir / "report.md", a.out_dir / XRT_PNG, a.out_dir / BREAKDOWN_PNG):
        path = build_report(a.bench_csv, a.bench_metrics, a.parity, a.source, a.out_dir, convert_files=a.convert,
                            env_json=a.env, serve_csv=a.serve, peer_json=a.peer,
                            serve_open_csv=a.serve_open)
        print(f"wrote {path}")
