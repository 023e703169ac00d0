"""`dvc repro` on a fresh copy of the repository, offline, with the tiny checkpoint."""

import re
import subprocess
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


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path}: '{old}' not found"
    path.write_text(text.replace(old, new))


@pytest.fixture(scope="module")
def fresh_clone(module_tmp, copy_repo):
    dest = module_tmp.mktemp("clone") / "repo"
    env = copy_repo(dest)
    # The clone's own conf/ selects the tiny checkpoint and small benchmark settings, so that `dvc exp run`
    # (which recomposes params.yaml from conf/) stays on them. The test checks wiring, not figures.
    _edit(dest / "conf/config.yaml", "checkpoint: random-80m", "checkpoint: tiny")
    _edit(dest / "conf/parity/default.yaml", "decode_steps: 64 ", "decode_steps: 16 ")
    bench = dest / "conf/bench/default.yaml"
    for key, value in (("num_tokens", 16), ("repeats", 1), ("warmup_tokens", 4), ("batch_size", 2), ("upstream_repeats", 1),
                       ("passes", 1)):
        bench.write_text(re.sub(rf"^{key}: \S+", f"{key}: {value}", bench.read_text(), flags=re.M))
    for key, value in (("steps", 12), ("rounds", 1)):  # bench.peer
        bench.write_text(re.sub(rf"^  {key}: \S+", f"  {key}: {value}", bench.read_text(), flags=re.M))
    serve = dest / "conf/serve_bench/default.yaml"
    for key, value in (("clients", "[1, 2]"), ("upstream_clients", "[1]"), ("max_new_tokens", 16), ("max_requests", 2),
                       ("level_s", 3), ("drain_s", 5), ("upstream_level_s", 3), ("upstream_drain_s", 5),
                       ("idle_timeout_s", 5), ("warmup_requests", 1), ("open_streams", "[2]"), ("open_level_s", 3),
                       ("open_drain_s", 5)):
        serve.write_text(re.sub(rf"^{key}:[^#\n]*", f"{key}: {value} ", serve.read_text(), flags=re.M))
    (dest / "params.yaml").write_text(yaml.safe_dump(compose(conf_dir=dest / "conf"), sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone"]):
        _run(cmd, dest, env)
    return dest, env


def test_repro_builds_everything_then_nothing_then_only_dependents(fresh_clone):
    repo, env = fresh_clone
    first = _run(["dvc", "repro"], repo, env)
    ran = _ran_stages(first)
    assert ran[:4] == ["fetch", "export_decoder", "export_lm", "parity"]
    assert {"benchmark", "peer", "report"} <= set(ran) and any(s.startswith("convert@") for s in ran), ran
    for path in ("artifacts/checkpoints/tiny/model.safetensors", "artifacts/export/decoder/soprano_decoder_preistft.onnx",
                 "artifacts/export/lm/soprano_lm_step.onnx", "artifacts/export/lm/tokenizer.json", "metrics/parity.json",
                 "artifacts/openvino/int8/lm/soprano_lm_step.xml", "artifacts/onnx/int8/lm/soprano_lm_step.onnx",
                 "reports/bench.csv", "reports/bench_env.json", "reports/report.md", "reports/xrt_by_backend.png",
                 "reports/serve.csv", "reports/serve_open.csv", "metrics/serve.json", "artifacts/onnx/int8/certificate.json",
                 "artifacts/release/tiny/config.json", "artifacts/release/tiny/README.md",
                 "artifacts/release/tiny/onnx/soprano_lm_step_quantized.onnx"):
        assert (repo / path).is_file(), path
    card = (repo / "artifacts/release/tiny/README.md").read_text()
    assert "| onnx-int8 | pass | guard |" in card and "| onnx-int8 | 2 |" in card, card

    second = _run(["dvc", "repro"], repo, env)
    assert _ran_stages(second) == [], second

    # A thread-count experiment reruns only what reads `threads`, and the release (its model card shows the benchmark).
    exp = _run(["dvc", "exp", "run", "-S", "threads=1"], repo, env)
    ran_exp = _ran_stages(exp)  # the two timing stages and what shows their figures (the report last)
    assert sorted(ran_exp) == ["benchmark", "peer", "release", "report"] and ran_exp[-1] == "report", exp
    assert yaml.safe_load((repo / "params.yaml").read_text())["bench"]["threads"] == [1, 1]
    shown = _run(["dvc", "exp", "show", "--csv"], repo, env)
    assert "threads" in shown and "xrt" in shown, shown[:2000]

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["parity"]["decode_steps"] = 8
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _run(["dvc", "repro"], repo, env)
    # The report reads metrics/parity.json, so it follows; nothing upstream of parity reruns.
    assert _ran_stages(third) == ["parity", "report"], third
    report = (repo / "reports/report.md").read_text()
    assert "random weights" in report.lower()
    assert "- Benchmark run: " in report  # the machine and date are the benchmark's record, not the report's


def test_failing_parity_fails_the_stage_and_leaves_no_metrics(fresh_clone):
    repo, env = fresh_clone
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["parity"]["lm_logits_max_abs"] = 1e-12
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.run(["dvc", "repro", "parity"], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0
    assert "lm_prefill_logits_max_abs" in proc.stdout + proc.stderr
    assert not (repo / "metrics/parity.json").exists()
