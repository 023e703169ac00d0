"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tiny` checkpoint (conf/checkpoint/tiny.yaml: 2 LM layers, real shapes otherwise), fetched once."""
    import yaml

    from pipeline_lib.checkpoint import CheckpointConfig, fetch_checkpoint

    cfg = CheckpointConfig.from_mapping(yaml.safe_load((REPO_ROOT / "conf/checkpoint/tiny.yaml").read_text()))
    return fetch_checkpoint(cfg, tmp_path_factory.mktemp("checkpoints") / "tiny")


@pytest.fixture(scope="session")
def tiny_export(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One self-contained export folder of the tiny checkpoint (decoder + LM + tokenizer), built once."""
    from pipeline_lib.export.decoder import export_decoder
    from pipeline_lib.export.lm import copy_tokenizer_files, export_lm

    out = tmp_path_factory.mktemp("export") / "tiny"
    export_decoder(tiny_checkpoint, out)
    export_lm(tiny_checkpoint, out)
    copy_tokenizer_files(tiny_checkpoint, out)
    return out
