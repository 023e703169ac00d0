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


@pytest.fixture(scope="session")
def tiny_openvino(tiny_checkpoint: Path, tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny export with OpenVINO IRs as the convert stage writes them: the decoder, the step LM
    (KV cache as inputs, soprano_lm_step.xml) and the stateful LM beside it (what from_dir prefers)."""
    import json
    import shutil

    pytest.importorskip("openvino")
    from pipeline_lib.convert import convert_lm_to_openvino_stateful, convert_onnx_to_openvino
    from pipeline_lib.openvino_stateful import stateful_config
    from pipeline_lib.registry import STATEFUL_CONFIG

    d = tmp_path_factory.mktemp("openvino") / "tiny"
    shutil.copytree(tiny_export, d)
    convert_onnx_to_openvino(d / "soprano_decoder_preistft.onnx", d / "soprano_decoder_preistft.xml")
    convert_onnx_to_openvino(d / "soprano_lm_step.onnx", d / "soprano_lm_step.xml")
    xml = convert_lm_to_openvino_stateful(tiny_checkpoint, d / "soprano_lm_stateful.xml")
    step_cfg = json.loads((d / "soprano_lm_step_config.json").read_text())
    (d / STATEFUL_CONFIG).write_text(json.dumps(stateful_config(step_cfg, {"file": xml.name})))
    return d


@pytest.fixture(scope="session")
def load_script():
    """A function that imports scripts/NAME.py as a module (the scripts are not a package)."""
    import importlib.util

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load


@pytest.fixture(scope="session")
def copy_repo():
    """A function that copies the repository's tracked and untracked-not-ignored files to `dest` (a fresh
    checkout, without artifacts or caches) and returns the environment to run dvc there: this venv's
    executables first on PATH, the hub offline."""
    import os
    import shutil
    import subprocess
    import sys

    def copy(dest: Path) -> dict[str, str]:
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO_ROOT, capture_output=True,
                               text=True, check=True).stdout.split()
        for name in files:
            if (REPO_ROOT / name).is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO_ROOT / name, dest / name)
        return dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", HF_HUB_OFFLINE="1")

    return copy


class ModuleTmp:
    """Folders made with `tmp_path_factory`, removed when the test module that asked for them ends."""

    def __init__(self, factory: pytest.TempPathFactory):
        self._factory = factory
        self._made: list[Path] = []

    def mktemp(self, basename: str) -> Path:
        path = self._factory.mktemp(basename)
        self._made.append(path)
        return path

    def remove_all(self) -> None:
        import shutil

        for path in self._made:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def module_tmp(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """`mktemp(name)` for module-scoped fixtures: the folders (exports, clones, venvs: up to a few GB in all)
    go away at the end of the module, so the suite's peak disk use stays at one module's plus the session's
    tiny artifacts; a module in which a test failed keeps them, to look at. Function-scoped `tmp_path`
    folders of passing tests go right after the test (`tmp_path_retention_policy` in pyproject.toml)."""
    failed_before = request.session.testsfailed
    made = ModuleTmp(tmp_path_factory)
    yield made
    if request.session.testsfailed == failed_before:
        made.remove_all()
