"""`soprano-onnx bench` on the tiny export, the sweep planning and ratios, and the stage layout in dvc.yaml."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline_lib.bench import COLUMNS
from pipeline_lib.bench.sweep import Job, Settings, add_ratios, artifact_configs, headline, job_argv, plan, thread_counts
from pipeline_lib.errors import SopranoOnnxError

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_TOKENS = 16
# Figures every runtime row measures, all of them times, sizes or rates that must be positive.
POSITIVE = ("load_s", "prefill_s", "per_token_median_ms", "per_token_p90_ms", "decode_s", "lm_s", "decoder_s",
            "istft_s", "audio_s", "wall_s", "rtf", "xrt", "peak_rss_mb")


def run_bench(tmp_path: Path, *args: str) -> tuple[dict, str]:
    out = tmp_path / "row.json"
    cmd = [sys.executable, "-m", "pipeline_lib.cli", "bench", *args, "--num_tokens", str(NUM_TOKENS),
           "--repeats", "2", "--num_threads", "1", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def check_row(row: dict, backend: str, stdout: str) -> None:
    assert list(row) == list(COLUMNS)
    assert row["backend"] == backend and row["precision"] == "fp32" and row["threads"] == 1
    assert row["config"] == f"{backend}-fp32-t1"
    assert row["max_new_tokens"] == NUM_TOKENS and row["num_tokens"] == NUM_TOKENS and row["stop_emitted"] == 0
    assert row["repeats"] == 2
    for key in POSITIVE:
        assert isinstance(row[key], float) and row[key] > 0, (key, row[key])
    assert row["per_token_p90_ms"] >= row["per_token_median_ms"]
    assert row["rtf"] == pytest.approx(row["wall_s"] / row["audio_s"], rel=1e-9)
    assert row["xrt"] == pytest.approx(1.0 / row["rtf"], rel=1e-9)
    assert row["lm_s"] == pytest.approx(row["prefill_s"] + row["decode_s"], rel=1e-9)
    # 16 hidden vectors -> 15 * 2048 samples at 32 kHz
    assert row["audio_s"] == pytest.approx((NUM_TOKENS - 1) * 2048 / 32000)
    assert row["other_s"] > 0  # the figures of one run: they add up
    assert row["lm_s"] + row["decoder_s"] + row["istft_s"] + row["other_s"] == pytest.approx(row["wall_s"], rel=1e-9)
    assert f"fixed {NUM_TOKENS} tokens; random weights never emit [STOP]" in row["note"]
    assert f"fixed {NUM_TOKENS} tokens; random weights never emit [STOP]" in stdout
    assert "RTF" in stdout and "x real time" in stdout


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_bench_command_runtime_backends(tiny_export, tmp_path, backend):
    row, stdout = run_bench(tmp_path, "--backend", backend, "--lm", str(tiny_export), "--decoder", str(tiny_export),
                            "--batch", "2")
    check_row(row, backend, stdout)
    assert row["first_chunk_ms"] > 0
    assert row["batch_size"] == 2 and row["batch_audio_s"] > 0 and row["batch_wall_s"] > 0
    assert row["batch8_xrt"] == pytest.approx(row["batch_audio_s"] / row["batch_wall_s"], rel=1e-9)
    for key in ("speedup_vs_torch", "speedup_vs_fp32"):  # filled in by the sweep
        assert row[key] is None


def test_bench_command_torch_reference(tiny_checkpoint, tmp_path):
    row, stdout = run_bench(tmp_path, "--backend", "torch", "--lm", str(tiny_checkpoint))
    check_row(row, "torch", stdout)
    # The reference has no streaming or batch path: those columns are unmeasured (null in JSON).
    assert row["first_chunk_ms"] is None and row["batch8_xrt"] is None and row["batch_size"] == 0


def test_bench_model_files_may_be_given_directly(tiny_export, tmp_path):
    row, _ = run_bench(tmp_path, "--backend", "onnx", "--lm", str(tiny_export / "soprano_lm_step.onnx"),
                       "--decoder", str(tiny_export / "soprano_decoder_preistft.onnx"), "--batch", "0", "--no_stream")
    assert row["xrt"] > 0 and row["first_chunk_ms"] is None and row["batch8_xrt"] is None


def test_bench_rejects_bad_arguments(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline_lib.cli", "bench", "--backend", "onnx", "--lm", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--decoder" in proc.stderr


@pytest.mark.slow
def test_bench_command_upstream(tiny_checkpoint, tmp_path):
    pytest.importorskip("soprano")
    out = tmp_path / "row.json"
    proc = subprocess.run([sys.executable, "-m", "pipeline_lib.cli", "bench", "--backend", "upstream", "--lm",
                           str(tiny_checkpoint), "--repeats", "1", "--num_tokens", "12", "--warmup_tokens", "4",
                           "--json", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = json.loads(out.read_text())
    # Upstream's generate() is held to the bench's token count (token for token with ours).
    assert row["max_new_tokens"] == 12
    assert 0 < row["num_tokens"] <= 12
    assert row["audio_s"] == pytest.approx((row["num_tokens"] - 1) * 2048 / 32000)
    assert row["rtf"] == pytest.approx(row["wall_s"] / row["audio_s"], rel=1e-9)
    assert row["lm_s"] > 0 and row["decoder_s"] > 0
    # infer_batch on the eight bench sentences, infer_stream's first chunk, the process's peak RSS.
    assert row["batch_size"] == 8 and row["batch_wall_s"] > 0 and row["batch8_xrt"] > 0
    assert 0 < row["batch_audio_s"] <= 8 * 11 * 2048 / 32000
    assert row["first_chunk_ms"] > 0 and row["peak_rss_mb"] > 0
    assert "max_new_tokens=12" in row["note"]


def test_thread_counts_dedupes_and_keeps_order():
    assert thread_counts([1, "2", 2]) == [1, 2]
    assert thread_counts([2, 1]) == [2, 1]
    with pytest.raises(SopranoOnnxError):
        thread_counts([])
    with pytest.raises(SopranoOnnxError):
        thread_counts([0])


def test_thread_interpolation_resolves_from_params(tmp_path):
    from omegaconf import OmegaConf

    from pipeline_lib.config import compose

    for threads, expected in ((2, [1, 2]), (8, [1, 8]), (1, [1])):
        cfg = OmegaConf.create(compose([f"threads={threads}"]))
        assert thread_counts(cfg.bench.threads) == expected


def _layout(root: Path, *bases: str) -> None:
    for base in bases:
        for part in ("lm", "decoder"):
            (root / base / part).mkdir(parents=True)


ALL_TARGETS = artifact_configs(["onnx", "openvino"], ["fp32", "int8"])


def test_plan_covers_what_convert_builds(tmp_path, monkeypatch):
    import pipeline_lib.bench.sweep as sweep

    monkeypatch.setattr(sweep, "upstream_available", lambda: True)
    _layout(tmp_path, "artifacts/export", "artifacts/onnx/int8", "artifacts/openvino/fp32", "artifacts/openvino/int8")
    ckpt = tmp_path / "artifacts/checkpoints/x"
    jobs = plan(tmp_path, ckpt, [1, 4], ALL_TARGETS, upstream_threads=4)
    assert [j.label for j in jobs] == [
        "onnx-fp32-t1", "onnx-fp32-t4", "onnx-int8-t1", "onnx-int8-t4", "openvino-fp32-t1", "openvino-fp32-t4",
        "openvino-int8-t1", "openvino-int8-t4", "torch-fp32-t1", "torch-fp32-t4", "upstream-fp32-t4"]
    assert jobs[0].lm == tmp_path / "artifacts/export/lm" and jobs[2].decoder == tmp_path / "artifacts/onnx/int8/decoder"
    assert jobs[4].lm == tmp_path / "artifacts/openvino/fp32/lm"
    assert jobs[-3].decoder == ckpt / "decoder.pth" and jobs[-1].optional and not jobs[0].optional
    # Without a convert stage only the export exists; backends can be narrowed.
    assert [j.label for j in plan(tmp_path, ckpt, [1], artifact_configs(None, None), backends=["onnx", "torch"])] == [
        "onnx-fp32-t1", "torch-fp32-t1"]


def test_plan_accepts_the_alternative_onnx_layouts(tmp_path, monkeypatch):
    import pipeline_lib.bench.sweep as sweep

    monkeypatch.setattr(sweep, "upstream_available", lambda: False)
    _layout(tmp_path, "artifacts/onnx/fp32", "artifacts/onnx_int8")
    jobs = plan(tmp_path, tmp_path / "ckpt", [2], artifact_configs(["onnx"], ["int8"]), backends=["onnx"])
    assert [j.lm for j in jobs] == [tmp_path / "artifacts/onnx/fp32/lm", tmp_path / "artifacts/onnx_int8/lm"]


def test_plan_fails_on_a_missing_artifact(tmp_path):
    _layout(tmp_path, "artifacts/export")
    with pytest.raises(SopranoOnnxError, match="convert@openvino-fp32"):
        plan(tmp_path, tmp_path / "ckpt", [1], artifact_configs(["openvino"], ["fp32"]))


def test_artifact_configs():
    assert artifact_configs(None, None) == [("onnx", "fp32")]
    assert ALL_TARGETS == [("onnx", "fp32"), ("onnx", "int8"), ("openvino", "fp32"), ("openvino", "int8")]
    assert artifact_configs(["openvino"], ["int8"]) == [("onnx", "fp32"), ("openvino", "int8")]


def test_stage_reads_the_targets_from_convert_params():
    import importlib.util

    from omegaconf import OmegaConf

    from pipeline_lib.config import compose

    spec = importlib.util.spec_from_file_location("stage_benchmark", REPO_ROOT / "stages/benchmark.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    params = OmegaConf.create(compose())
    expected = artifact_configs(list(params.convert.backends), list(params.convert.precisions)) if "convert" in params \
        else [("onnx", "fp32")]
    assert mod.convert_targets(params) == expected
    assert mod.convert_targets(OmegaConf.create({"threads": 2})) == [("onnx", "fp32")]


def test_job_argv_and_settings():
    job = Job("upstream", "fp32", 2, Path("ck"), optional=True)
    argv = job_argv(job, Settings(num_tokens=64, repeats=3, upstream_repeats=1, stream=False), Path("o.json"))
    assert argv[1:4] == ["-m", "pipeline_lib.cli", "bench"]
    assert argv[argv.index("--repeats") + 1] == "1" and "--no_stream" in argv and "--decoder" not in argv
    assert argv[argv.index("--num_threads") + 1] == "2" and argv[argv.index("--json") + 1] == "o.json"


def test_a_failing_configuration_fails_the_sweep_unless_optional(tmp_path):
    from pipeline_lib.bench.sweep import run_job

    settings = Settings(num_tokens=4, repeats=1, timeout_s=120)
    job = Job("onnx", "fp32", 1, tmp_path / "missing-lm", tmp_path / "missing-decoder")
    with pytest.raises(SopranoOnnxError, match="onnx-fp32-t1 failed"):
        run_job(job, settings, tmp_path)
    row = run_job(Job("upstream", "fp32", 1, tmp_path / "missing-ckpt", optional=True), settings, tmp_path)
    assert list(row) == list(COLUMNS) and row["note"].startswith("failed: ") and math.isnan(row["xrt"])


def _row(backend: str, precision: str, threads: int, xrt: float) -> dict:
    row = {c: math.nan for c in COLUMNS}
    row.update(config=f"{backend}-{precision}-t{threads}", backend=backend, precision=precision, threads=threads,
               xrt=xrt, rtf=1 / xrt, max_new_tokens=512 if backend == "upstream" else 64)
    return row


def test_ratios_and_headline():
    rows = add_ratios([_row("onnx", "fp32", 1, 2.0), _row("onnx", "int8", 1, 3.0), _row("onnx", "fp32", 2, 4.0),
                       _row("torch", "fp32", 1, 1.0), _row("torch", "fp32", 2, 2.0), _row("upstream", "fp32", 2, 0.5)])
    by = {r["config"]: r for r in rows}
    assert by["onnx-int8-t1"]["speedup_vs_torch"] == 3.0 and by["onnx-int8-t1"]["speedup_vs_fp32"] == 1.5
    assert by["onnx-fp32-t2"]["speedup_vs_torch"] == 2.0 and by["upstream-fp32-t2"]["speedup_vs_torch"] == 0.25
    m = headline(rows, 2)
    assert m["threads"] == 2 and m["num_tokens"] == 64
    assert m["xrt"] == {"onnx_fp32": 4.0, "torch_fp32": 2.0, "upstream_fp32": 0.5}
    assert m["best_xrt"] == {"onnx": 4.0, "torch": 2.0, "upstream": 0.5}
    assert headline(rows, 1)["int8_speedup"] == {"onnx": 1.5}
    json.dumps(m, allow_nan=False)  # DVC metrics: no NaN


def test_only_benchmark_reads_threads_and_report_follows_it():
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    readers = {name for name, s in stages.items() for p in s.get("params", []) if p in ("threads", "bench")}
    assert readers == {"benchmark", "peer"}  # the two timing stages (peer: ONNX Runtime GenAI beside ours)
    assert set(stages["peer"]["params"]) == {"threads", "bench.peer"}
    assert set(stages["benchmark"]["params"]) == {"threads", "bench", "convert.backends", "convert.precisions"}
    assert "params" not in stages["report"]
    assert {"reports/bench.csv", "reports/bench_env.json", "metrics/bench.json"} <= set(stages["report"]["deps"])
    outs = [next(iter(o)) for o in stages["benchmark"]["outs"]]
    assert outs == ["reports/bench.csv", "reports/bench_env.json"]
    assert [next(iter(m)) for m in stages["benchmark"]["metrics"]] == ["metrics/bench.json"]


def test_merge_passes_keeps_the_best_pass_per_figure_and_the_worst_memory():
    from pipeline_lib.bench.sweep import merge_passes

    a = {"config": "onnx-int8-t2", "xrt": 10.0, "wall_s": 1.6, "first_chunk_ms": 50.0, "batch8_xrt": 40.0,
         "batch_audio_s": 100.0, "batch_wall_s": 2.5, "peak_rss_mb": 300.0, "note": "fixed 256 tokens"}
    b = dict(a, xrt=12.0, wall_s=1.33, first_chunk_ms=55.0, batch8_xrt=38.0, batch_wall_s=2.63, peak_rss_mb=290.0)
    out = merge_passes([a, b])
    assert out["xrt"] == 12.0 and out["wall_s"] == 1.33  # the fastest pass, its stage times with it
    assert out["first_chunk_ms"] == 50.0 and out["batch8_xrt"] == 40.0 and out["batch_wall_s"] == 2.5
    assert out["peak_rss_mb"] == 300.0
    assert out["note"] == "fixed 256 tokens; best of 2 passes"
    assert merge_passes([a]) == a
    nan_chunk = dict(b, first_chunk_ms=math.nan)
    assert merge_passes([nan_chunk, a])["first_chunk_ms"] == 50.0


def test_sweep_runs_passes_in_alternating_order(monkeypatch):
    from pipeline_lib.bench import sweep

    order: list[str] = []

    def fake_run(job, settings, workdir):
        order.append(job.label)
        return {"config": job.label, "backend": job.backend, "precision": job.precision, "threads": job.threads,
                "xrt": float(len(order)), "note": ""}

    monkeypatch.setattr(sweep, "run_job", fake_run)
    jobs = [sweep.Job("onnx", "fp32", 2, Path("a")), sweep.Job("onnx", "int8", 2, Path("b"))]
    rows = sweep.run_sweep(jobs, sweep.Settings(passes=3))
    assert order == ["onnx-fp32-t2", "onnx-int8-t2", "onnx-int8-t2", "onnx-fp32-t2", "onnx-fp32-t2", "onnx-int8-t2"]
    assert [r["xrt"] for r in rows] == [5.0, 6.0] and rows[0]["note"] == "best of 3 passes"
    with pytest.raises(Exception, match="passes"):
        sweep.run_sweep(jobs, sweep.Settings(passes=0))
