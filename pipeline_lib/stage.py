"""What every DVC stage script needs: the params, logging, and outputs that vanish on failure."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from pipeline_lib.errors import InputError, SopranoOnnxError
from pipeline_lib.fsutil import remove_outputs

log = logging.getLogger("pipeline_lib.stage")
PARAMS_FILE = Path("params.yaml")


def load_params(path: Path = PARAMS_FILE) -> Any:
    """params.yaml as an OmegaConf object (interpolations such as ${threads} resolved on access), checked
    by `pipeline_lib.config.validate_params`: a bad value (``dvc exp run -S bench.threads=[0]``, a hand
    edit) is an InputError naming it, raised before the stage does any work."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from pipeline_lib.config import validate_params

    if not path.is_file():
        raise SopranoOnnxError(f"{path}: not found; run the stage from the repository root (dvc repro does).")
    try:
        params = OmegaConf.load(path)
    except (OmegaConfBaseException, yaml.YAMLError) as exc:
        raise InputError(f"{path}: not a YAML mapping ({' '.join(str(exc).split())}); "
                         "recompose it with `python -m pipeline_lib.config`") from exc
    validate_params(params, str(path))
    return params


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


@contextlib.contextmanager
def stage_outputs(name: str, *outs: Path | str, keep_previous: bool = False) -> Iterator[None]:
    """Remove stale outputs first; on any failure remove what the stage wrote and exit non-zero.

    keep_previous: for outs declared `persist: true` in dvc.yaml (results that took long to make,
    committed for review: the benchmarks and the report): nothing is removed, before or on failure;
    the stage writes each out atomically when it is done (fsutil.atomic_file), so a failed run
    leaves the previous results as they were, and dvc.lock, which DVC updates only on success,
    keeps describing them."""
    setup_logging()
    if not keep_previous:
        remove_outputs(*outs)
    start = time.perf_counter()
    try:
        yield
    except SopranoOnnxError as exc:
        if not keep_previous:
            remove_outputs(*outs)
        log.error("stage %s failed: %s", name, exc)
        sys.exit(1)
    except BaseException:
        if not keep_previous:
            remove_outputs(*outs)
        raise
    log.info("stage %s done in %.1f s", name, time.perf_counter() - start)
