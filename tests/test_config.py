"""params.yaml is the Hydra composition of conf/, and every choice of every group composes."""

from pathlib import Path

import pytest
import yaml

from pipeline_lib.config import compose

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_equals_composition():
    committed = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    assert committed == compose(), "params.yaml is stale: run `python -m pipeline_lib.config` and commit it"


@pytest.mark.parametrize("choice", sorted(p.stem for p in (REPO_ROOT / "conf/checkpoint").glob("*.yaml")))
def test_every_checkpoint_choice_composes(choice):
    from pipeline_lib.checkpoint import CheckpointConfig

    overrides = [f"checkpoint={choice}"] + (["checkpoint.path=/tmp/x"] if choice == "local" else [])
    cfg = CheckpointConfig.from_mapping(compose(overrides)["checkpoint"])
    assert cfg.name == choice


def test_threads_override_is_top_level():
    assert compose(["threads=8"])["threads"] == 8
