"""`dvc repro` on a fresh copy of the repository, offline, with the tiny checkpoint."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline_lib.config import compose

REPO_ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(cmd, cwd, env):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def _ran_stages(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory):
    dest = tmp_path_factory.mktemp("clone") / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO_ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (REPO_ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, dest / name)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", HF_HUB_OFFLINE="1")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone"]):
        _run(cmd, dest, env)
    # Small benchmark settings: the test checks the pipeline's wiring, not the figures.
    params = compose(["checkpoint=tiny", "parity.decode_steps=16", "bench.num_tokens=16", "bench.repeats=1",
                      "bench.warmup_tokens=4", "bench.batch_size=2"])
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest, env


def test_repro_builds_everything_then_nothing_then_only_dependents(fresh_clone):
    repo, env = fresh_clone
    first = _run(["dvc", "repro"], repo, env)
    ran = _ran_stages(first)
    assert ran[:4] == ["fetch", "export_decoder", "export_lm", "parity"]
    assert {"benchmark", "report"} <= set(ran) and any(s.startswith("convert@") for s in ran), ran
    for path in ("artifacts/checkpoints/tiny/model.safetensors", "artifacts/export/decoder/soprano_decoder_preistft.onnx",
                 "artifacts/export/lm/soprano_lm_step.onnx", "artifacts/export/lm/tokenizer.json", "metrics/parity.json",
                 "artifacts/openvino/int8/lm/soprano_lm_step.xml", "artifacts/onnx/int8/lm/soprano_lm_step.onnx",
                 "reports/bench.csv", "reports/report.md", "reports/xrt_by_backend.png"):
        assert (repo / path).is_file(), path

    second = _run(["dvc", "repro"], repo, env)
    assert _ran_stages(second) == [], second

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["parity"]["decode_steps"] = 8
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _run(["dvc", "repro"], repo, env)
    # The report reads metrics/parity.json, so it follows; nothing upstream of parity reruns.
    assert _ran_stages(third) == ["parity", "report"], third
    report = (repo / "reports/report.md").read_text()
    assert "random weights" in report.lower()


def test_failing_parity_fails_the_stage_and_leaves_no_metrics(fresh_clone):
    repo, env = fresh_clone
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["parity"]["lm_logits_max_abs"] = 1e-12
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.run(["dvc", "repro", "parity"], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0
    assert "lm_prefill_logits_max_abs" in proc.stdout + proc.stderr
    assert not (repo / "metrics/parity.json").exists()
