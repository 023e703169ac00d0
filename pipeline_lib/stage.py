"""What every DVC stage script needs: the params, logging, and outputs that vanish on failure."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from pipeline_lib.errors import SopranoOnnxError
from pipeline_lib.fsutil import remove_outputs

log = logging.getLogger("pipeline_lib.stage")
PARAMS_FILE = Path("params.yaml")


def load_params(path: Path = PARAMS_FILE) -> Any:
    """params.yaml as an OmegaConf object (interpolations such as ${threads} resolved on access)."""
    from omegaconf import OmegaConf

    if not path.is_file():
        raise SopranoOnnxError(f"{path}: not found; run the stage from the repository root (dvc repro does).")
    return OmegaConf.load(path)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


@contextlib.contextmanager
def stage_outputs(name: str, *outs: Path | str) -> Iterator[None]:
    """Remove stale outputs first; on any failure remove what the stage wrote and exit non-zero."""
    setup_logging()
    remove_outputs(*outs)
    start = time.perf_counter()
    try:
        yield
    except SopranoOnnxError as exc:
        remove_outputs(*outs)
        log.error("stage %s failed: %s", name, exc)
        sys.exit(1)
    except BaseException:
        remove_outputs(*outs)
        raise
    log.info("stage %s done in %.1f s", name, time.perf_counter() - start)
