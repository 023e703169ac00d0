"""The report from a small synthetic CSV + metrics: every number in it, the random-weights line, the PNGs."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline_lib.bench import COLUMNS
from pipeline_lib.report import BREAKDOWN_PNG, RANDOM_WEIGHTS_LINE, XRT_PNG, Environment, build_report, fmt

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV = Environment(cpu="Test CPU 9000", logical_cpus=2, physical_cores=1, python="3.x",
                  libraries={"numpy": "9.9.1", "onnxruntime": "9.9.2"}, date="2000-01-02 03:04 UTC")


def synthetic_rows() -> list[dict]:
    """Distinct, awkward numbers, so that a value shown in the wrong place or rounded away is caught."""
    rows = []
    configs = [("onnx", "fp32", 1), ("onnx", "fp32", 2), ("onnx", "int8", 2), ("openvino", "int8", 1),
               ("torch", "fp32", 1), ("torch", "fp32", 2), ("upstream", "fp32", 2)]
    for i, (backend, precision, threads) in enumerate(configs):
        base = 1.0 + 0.1234567 * (i + 1)
        row = {c: math.nan for c in COLUMNS}
        upstream = backend == "upstream"
        row.update(
            config=f"{backend}-{precision}-t{threads}", backend=backend, precision=precision, threads=threads,
            max_new_tokens=512 if upstream else 48, num_tokens=512 if upstream else 48, stop_emitted=0,
            repeats=1 if upstream else 3, load_s=0.5 * base, lm_s=1.7 * base, decoder_s=0.21 * base,
            wall_s=2.0 * base, audio_s=2.9375 + (30.0 if upstream else 0.0),
            peak_rss_mb=600.0 + 37.77 * i, load_avg=0.4 + 0.011 * i,
            note=f"fixed {'512' if upstream else '48'} tokens; random weights never emit [STOP]",
        )
        if not upstream:
            row.update(prefill_s=0.07 * base, per_token_median_ms=11.0 * base, per_token_p90_ms=12.5 * base,
                       istft_s=0.0031 * base)
            row["decode_s"] = row["lm_s"] - row["prefill_s"]
            row["other_s"] = row["wall_s"] - row["lm_s"] - row["decoder_s"] - row["istft_s"]
        else:
            row["other_s"] = row["wall_s"] - row["lm_s"] - row["decoder_s"]
        if backend in ("onnx", "openvino"):
            row.update(first_chunk_ms=123.4 + i, batch_size=8, batch_audio_s=23.5, batch_wall_s=4.4 + i)
            row["batch8_xrt"] = row["batch_audio_s"] / row["batch_wall_s"]
        else:
            row["batch_size"] = 0
        row["rtf"] = row["wall_s"] / row["audio_s"]
        row["xrt"] = 1 / row["rtf"]
        rows.append(row)
    from pipeline_lib.bench.sweep import add_ratios

    return add_ratios(rows)


@pytest.fixture()
def inputs(tmp_path):
    import pandas as pd

    from pipeline_lib.bench.sweep import headline, to_frame

    rows = synthetic_rows()
    csv = tmp_path / "bench.csv"
    to_frame(rows).to_csv(csv, index=False, float_format="%.6g")
    metrics = tmp_path / "bench.json"
    metrics.write_text(json.dumps(headline(pd.read_csv(csv).to_dict("records"), 2)))
    parity = tmp_path / "parity.json"
    parity.write_text(json.dumps({"onnx_fp32": {"decoder_audio_snr_db": 123.456789, "lm_logits_max_abs": 0.000579833}}))
    parity_ov = tmp_path / "parity_openvino.json"
    parity_ov.write_text(json.dumps({"openvino_int8": {"decoder_audio_snr_db": 41.0625, "lm_greedy_token_agreement": 0.96875}}))
    convert = tmp_path / "convert_openvino_int8.json"
    convert.write_text(json.dumps({"openvino_int8": {"lm_seconds": 12.3456, "lm_mb": 87.654, "lm_size_ratio": 0.2571}}))
    source = tmp_path / "source.json"
    source.write_text(json.dumps({"name": "random-80m", "source": "random", "random_weights": True, "seed": 0,
                                  "num_layers": 17, "lm_head_scale": 40.0, "repo_id": None, "revision": None}))
    return tmp_path, csv, metrics, [parity, parity_ov], source, [convert]


def _numbers(obj) -> list:
    if isinstance(obj, dict):
        return [n for v in obj.values() for n in _numbers(v)]
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return [obj]
    return []


def test_report_holds_every_number_of_its_inputs(inputs):
    import pandas as pd

    tmp, csv, metrics, parity, source, convert = inputs
    text = build_report(csv, metrics, parity, source, tmp / "out", env=ENV, convert_files=convert).read_text()
    cells = set(re.findall(r"(?<=\| )[^|\n]*?(?= \|)", text))

    df = pd.read_csv(csv)
    missing = []
    for _, row in df.iterrows():
        for col in COLUMNS:
            v = row[col]
            if isinstance(v, float) and math.isnan(v):
                continue
            if fmt(v) not in cells:
                missing.append((row["config"], col, fmt(v)))
    assert not missing, missing
    for v in _numbers(json.loads(metrics.read_text())):
        assert fmt(v) in text, v
    for p in [*parity, *convert]:
        for v in _numbers(json.loads(p.read_text())):
            assert fmt(v) in cells, v
    # The environment and setup lines
    for s in ("Test CPU 9000", "2 logical CPUs", "numpy 9.9.1", "onnxruntime 9.9.2", "2000-01-02 03:04 UTC",
              "fixed at 48 new tokens", "random-80m"):
        assert s in text, s


def test_report_warns_when_the_machine_was_busy(inputs):
    import pandas as pd

    tmp, csv, metrics, parity, source, convert = inputs
    text = build_report(csv, metrics, parity, source, tmp / "out", env=ENV).read_text()
    assert "machine was busy" not in text  # load averages 0.4..0.47 on 2 CPUs
    df = pd.read_csv(csv)
    df.loc[3, "load_avg"] = 3.25
    df.to_csv(csv, index=False)
    text = build_report(csv, metrics, parity, source, tmp / "out", env=ENV).read_text()
    assert "machine was busy" in text and "up to 3.25 on 2 logical CPUs" in text


def test_report_takes_the_machine_from_the_benchmarks_record(inputs):
    """The CPU, libraries and date are the benchmark's (its bench_env.json), not where the report is
    built; without the record the report says where they were read."""
    from dataclasses import replace

    from pipeline_lib.errors import InputError
    from pipeline_lib.fsutil import write_json
    from pipeline_lib.report import ENV_JSON, Environment

    tmp, csv, metrics, parity, source, convert = inputs
    recorded = replace(ENV, cpu="Bench CPU 1 (avx2)", date="2000-01-02 03:04 UTC to 2000-01-02 03:20 UTC",
                       origin="benchmark")
    env_json = tmp / ENV_JSON
    write_json(env_json, recorded.to_dict())
    assert Environment.from_json(env_json) == recorded
    text = build_report(csv, metrics, parity, source, tmp / "out", env_json=env_json).read_text()
    assert "- CPU: Bench CPU 1 (avx2); 2 logical CPUs" in text
    assert "- Benchmark run: 2000-01-02 03:04 UTC to 2000-01-02 03:20 UTC" in text
    assert "onnxruntime 9.9.2" in text and "was not given" not in text

    text = build_report(csv, metrics, parity, source, tmp / "out", env=ENV).read_text()  # origin "report"
    assert "- Date: 2000-01-02 03:04 UTC (CPU, libraries and date read where this report was built" in text

    for bad in ({"cpu": "x"}, ["not", "an", "object"]):
        write_json(env_json, bad)
        with pytest.raises(InputError, match="not a benchmark environment record"):
            build_report(csv, metrics, parity, source, tmp / "out", env_json=env_json)
    for broken in ("{", None):  # not JSON; missing
        env_json.unlink(missing_ok=True)
        if broken:
            env_json.write_text(broken)
        with pytest.raises(InputError, match="cannot read the benchmark environment record"):
            build_report(csv, metrics, parity, source, tmp / "out", env_json=env_json)


def test_report_opens_with_the_random_weights_line(inputs):
    tmp, csv, metrics, parity, source, convert = inputs
    lines = build_report(csv, metrics, parity, source, tmp / "out", env=ENV).read_text().splitlines()
    assert any(RANDOM_WEIGHTS_LINE in line for line in lines[:4])
    assert RANDOM_WEIGHTS_LINE == "**Random weights: audio is noise, timings are valid.**"


def test_report_of_a_hub_checkpoint_names_it_and_has_no_random_line(inputs):
    tmp, csv, metrics, parity, source, convert = inputs
    source.write_text(json.dumps({"name": "soprano-1.1-80m", "source": "hub", "random_weights": False,
                                  "repo_id": "ekwek/Soprano-1.1-80M", "revision": "0123abcd"}))
    text = build_report(csv, metrics, parity, source, tmp / "out", env=ENV).read_text()
    assert "Random weights" not in text
    assert "`ekwek/Soprano-1.1-80M`" in text and "`0123abcd`" in text


def test_report_pngs_exist_and_are_not_blank(inputs):
    import matplotlib.image as mpimg

    tmp, csv, metrics, parity, source, convert = inputs
    build_report(csv, metrics, parity, source, tmp / "out", env=ENV)
    text = (tmp / "out/report.md").read_text()
    for name in (XRT_PNG, BREAKDOWN_PNG):
        path = tmp / "out" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 20_000, (name, path.stat().st_size)
        img = mpimg.imread(path)
        assert img.shape[0] > 400 and img.shape[1] > 700
        assert img[..., :3].std() > 0.05  # bars, text and axes, not one flat colour
        assert f"({name})" in text
    assert not list((tmp / "out").glob(".*tmp*"))  # atomic writes leave no temporaries


def test_report_stage_script(inputs):
    tmp, csv, metrics, parity, source, convert = inputs
    out = tmp / "reports"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "stages/report.py"), str(source), str(csv), str(metrics),
                           str(out), "--parity", *map(str, parity),
                           "--convert", *map(str, convert)], cwd=tmp, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == {"report.md", XRT_PNG, BREAKDOWN_PNG}


def test_fmt():
    assert fmt(2) == "2" and fmt(2.0) == "2" and fmt(0.000579833) == "0.0005798" and fmt(123.456789) == "123.5"
    assert fmt(float("nan")) == "-" and fmt(None) == "-" and fmt("x") == "x"


def test_parity_files_and_folders_merge_without_hiding_figures(tmp_path):
    from pipeline_lib.report import read_parity

    (tmp_path / "convert").mkdir()
    (tmp_path / "parity.json").write_text(json.dumps({"onnx_fp32": {"snr": 120.5}}))
    (tmp_path / "convert/onnx-fp32.json").write_text(json.dumps({"onnx_fp32": {"snr": 121.25}}))
    (tmp_path / "convert/openvino-int8.json").write_text(json.dumps({"openvino_int8": {"cos": 0.995}}))
    (tmp_path / "flat.json").write_text(json.dumps({"snr": 99.5}))
    merged = read_parity([tmp_path / "parity.json", tmp_path / "convert", tmp_path / "flat.json"])
    assert merged == {"onnx_fp32": {"snr": 120.5}, "onnx_fp32 (convert/onnx-fp32.json)": {"snr": 121.25},
                      "openvino_int8": {"cos": 0.995}, "flat": {"snr": 99.5}}


def test_upstream_table_gives_ratios_and_verdicts():
    from pipeline_lib.report import upstream_lines

    up = {"backend": "upstream", "precision": "fp32", "threads": 2, "xrt": 2.0, "batch8_xrt": 10.0,
          "first_chunk_ms": 200.0, "peak_rss_mb": 1000.0}
    fp32 = {"backend": "onnx", "precision": "fp32", "threads": 2, "xrt": 6.0, "batch8_xrt": 30.0,
            "first_chunk_ms": 100.0, "peak_rss_mb": 480.0}
    int8 = {"backend": "onnx", "precision": "int8", "threads": 2, "xrt": 9.0, "batch8_xrt": 41.0,
            "first_chunk_ms": 40.0, "peak_rss_mb": 300.0}
    ov = dict(fp32, backend="openvino", peak_rss_mb=1900.0)
    other_threads = dict(int8, threads=1, xrt=1.0)
    text = "\n".join(upstream_lines([up, fp32, int8, ov, other_threads]))
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): [c.strip() for c in line.strip("|").split("|")]
            for line in text.splitlines() if line.startswith("| ") and "figure" not in line}
    assert rows[("one sentence, x real time", "ONNX Runtime fp32")][4:] == ["3", ">= 2.5", "met"]
    assert rows[("one sentence, x real time", "ONNX Runtime int8")][4:] == ["4.5", ">= 5", "not met"]
    assert rows[("eight sentences (infer_batch), x real time", "ONNX Runtime int8")][4:] == ["4.1", ">= 4", "met"]
    assert rows[("streaming first chunk, ms", "ONNX Runtime fp32")][4:] == ["0.5", "<= 0.25", "not met"]
    assert rows[("peak RSS, MiB", "ONNX Runtime fp32")][4:] == ["0.48", "<= 0.5", "met"]
    assert rows[("peak RSS, MiB", "OpenVINO fp32")][5:] == ["-", "-"]  # the RSS target is ONNX Runtime fp32's
    assert "| 1 |" not in text  # only upstream's thread count
    assert upstream_lines([fp32, int8]) == []


def test_per_token_targets_compare_backends_and_precisions():
    from pipeline_lib.report import per_token_lines

    def row(backend, precision, threads, ms):
        return {"backend": backend, "precision": precision, "threads": threads, "per_token_median_ms": ms}

    rows = [row("onnx", "fp32", 2, 12.0), row("onnx", "int8", 2, 6.0), row("openvino", "fp32", 2, 11.4),
            row("openvino", "int8", 2, 7.5), row("onnx", "fp32", 1, 18.0), row("onnx", "int8", 1, float("nan")),
            row("torch", "fp32", 2, 30.0)]
    text = "\n".join(per_token_lines(rows))
    got = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): [c.strip() for c in line.strip("|").split("|")][2:]
           for line in text.splitlines() if line.startswith("| ") and "figure" not in line}
    assert got[("ONNX Runtime: fp32 over int8", "2")] == ["12", "6", "2", ">= 1.7", "met"]
    assert got[("OpenVINO: fp32 over int8", "2")] == ["11.4", "7.5", "1.52", ">= 1.7", "not met"]
    assert got[("fp32: OpenVINO over ONNX Runtime", "2")] == ["11.4", "12", "0.95", "<= 1", "met"]
    assert got[("int8: OpenVINO over ONNX Runtime", "2")] == ["7.5", "6", "1.25", "<= 1", "not met"]
    assert not any(k[1] == "1" for k in got)  # thread count 1 has no pair with both figures
    assert per_token_lines([row("onnx", "fp32", 2, 12.0)]) == []


def test_cpu_model_names_the_vector_extensions(tmp_path):
    from pipeline_lib.report import cpu_model

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n\n"
                    "processor\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n")
    assert cpu_model(info) == "AMD EPYC (avx2)"
    info.write_text("model name\t: Xeon\nflags\t\t: avx2 avx512f avx512_vnni amx_int8\n")
    assert cpu_model(info) == "Xeon (avx2, avx512f, avx512_vnni, amx_int8)"
    info.write_text("model name\t: Old\nflags\t\t: sse2\n")
    assert cpu_model(info).startswith("Old (none of avx2")
    assert cpu_model(tmp_path / "missing") not in ("", None)
