"""Stage release: ROOT BENCH_CSV BENCH_ENV OUT -> OUT, the release bundle of params release.targets
(pipeline_lib.release: onnx-community layout, certificates, model card with parity and benchmark tables)."""

import sys
from pathlib import Path

from pipeline_lib.release import build_bundle
from pipeline_lib.stage import load_params, stage_outputs

if __name__ == "__main__":
    root, bench_csv, bench_env, out = map(Path, sys.argv[1:5])
    params = load_params().release
    with stage_outputs("release", out):
        build_bundle(root, list(params.targets), out, str(params.default), bench_csv, bench_env)
