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


def test_convert_targets_must_be_the_registered_pairs():
    """dvc.yaml's convert stages run foreach over convert.targets: a stale list (a precision dropped from
    convert.precisions, a pair the registry lacks) is named by the params check."""
    from pipeline_lib.config import validate_params
    from pipeline_lib.errors import InputError

    params = compose()
    validate_params(params)
    stale = {**params, "convert": {**params["convert"], "precisions": ["fp32", "int8"]}}
    with pytest.raises(InputError, match="convert.targets"):
        validate_params(stale)
    bad = dict(params["convert"]["targets"])
    bad["onnx-bf16"] = {"backend": "onnx", "precision": "bf16"}
    with pytest.raises(InputError, match="convert.targets"):
        validate_params({**params, "convert": {**params["convert"], "targets": bad}})
    wrong = {**params["convert"]["targets"], "onnx-int4": {"backend": "onnx", "precision": "int8"}}
    with pytest.raises(InputError, match=r"convert.targets.onnx-int4"):
        validate_params({**params, "convert": {**params["convert"], "targets": wrong}})


@pytest.mark.parametrize("release, where", [({"targets": ["openvino-int8"], "default": "openvino-int8"}, "release.targets"),
                                            ({"targets": [], "default": "onnx-int8"}, "release.targets"),
                                            ({"targets": ["onnx-int8"], "default": "onnx-int4"}, "release.default")])
def test_release_params_are_bundleable_onnx_targets(release, where):
    from pipeline_lib.config import validate_params
    from pipeline_lib.errors import InputError

    params = compose(conf_dir=REPO_ROOT / "conf")
    validate_params({**params, "release": {"targets": ["onnx-int8", "onnx-int4", "onnx-fp32"], "default": "onnx-fp32"}})
    with pytest.raises(InputError, match=where):
        validate_params({**params, "release": release})
