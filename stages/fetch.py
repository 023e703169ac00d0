"""Stage fetch: OUT_DIR <- the checkpoint chosen in params (checkpoint group), in the upstream layout."""

import sys
from pathlib import Path

from pipeline_lib.checkpoint import CheckpointConfig, fetch_checkpoint
from pipeline_lib.stage import load_params, stage_outputs

if __name__ == "__main__":
    out = Path(sys.argv[1])
    cfg = CheckpointConfig.from_mapping(load_params().checkpoint)
    with stage_outputs("fetch", out):
        fetch_checkpoint(cfg, out)
