"""The review report: reports/report.md and its PNG plots, built only from one run's CSV and metrics.

Inputs: the benchmark CSV (one row per backend x precision x threads, pipeline_lib.bench.COLUMNS),
the benchmark metrics JSON (headline figures), the parity metrics JSON files, and the checkpoint's
source.json, and the environment the benchmark ran in (CPU, cores, library versions, when: the benchmark
stage's bench_env.json, `pipeline_lib.environment.Environment.here()` in that stage); without that file
it is read where the report is built, and the report says so.
With the server load benchmark's CSV (serve.csv, pipeline_lib.bench.serve_summary.COLUMNS) the report
gains the section "Server under load" (pipeline_lib.report_serve), with the open loop's table and the
capacity when serve_open.csv is given too. The plots are drawn by pipeline_lib.report_plots; this module
names their files (XRT_PNG, BREAKDOWN_PNG) and writes them.
Every number in the report is formatted by `fmt` from those inputs; none is written here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

# Environment and its helpers live in pipeline_lib.environment (the benchmark stage records one); the
# report reads them, and they stay importable from here.
from pipeline_lib.environment import ENV_JSON, Environment, cpu_model, utc_now  # noqa: F401
from pipeline_lib import recommend, registry
from pipeline_lib.errors import InputError
from pipeline_lib.registry import BACKENDS, DISPLAY_NAMES, PRECISIONS, REFERENCES, TARGETS
from pipeline_lib.report_format import columns_table, fmt, md_table  # noqa: F401  (fmt: the report's readers)
from pipeline_lib.report_plots import plot_breakdown, plot_xrt
from pipeline_lib.report_serve import SERVE_PNG, serve_lines  # noqa: F401

RANDOM_WEIGHTS_LINE = "**Random weights: audio is noise, timings are valid.**"
XRT_PNG = "xrt_by_backend.png"
BREAKDOWN_PNG = "stage_breakdown.png"
BACKEND_ORDER = (*REFERENCES, *BACKENDS)
BACKEND_NAMES = DISPLAY_NAMES

# Report tables: (CSV column, header). Between them they show every column of the CSV.
RTF_TABLE = (
    ("backend", "backend"), ("precision", "precision"), ("threads", "threads"), ("num_tokens", "tokens"),
    ("audio_s", "audio (s)"), ("wall_s", "wall (s)"), ("rtf", "RTF"), ("xrt", "x real time"),
    ("speedup_vs_torch", "speedup vs PyTorch"), ("speedup_vs_fp32", "speedup vs fp32"),
    ("first_chunk_ms", "first chunk (ms)"), ("batch8_xrt", "batch x real time"), ("peak_rss_mb", "peak RSS (MiB)"),
)
STAGE_TABLE = (
    ("config", "configuration"), ("load_s", "load (s)"), ("prefill_s", "prefill (s)"),
    ("per_token_median_ms", "per token median (ms)"), ("per_token_p90_ms", "per token p90 (ms)"),
    ("decode_s", "decode (s)"), ("lm_s", "LM total (s)"), ("decoder_s", "decoder (s)"), ("istft_s", "ISTFT (s)"),
    ("other_s", "other (s)"), ("wall_s", "wall (s)"),
)
RUN_TABLE = (
    ("config", "configuration"), ("max_new_tokens", "max new tokens"), ("num_tokens", "tokens generated"),
    ("stop_emitted", "[STOP] emitted"), ("repeats", "repeats"), ("batch_size", "batch texts"),
    ("batch_audio_s", "batch audio (s)"), ("batch_wall_s", "batch wall (s)"), ("load_avg", "load average"),
    ("note", "note"),
)


def read_json(path: Path | str) -> Any:
    return json.loads(Path(path).read_text())


def metric_files(paths: Sequence[Path]) -> list[Path]:
    """Files as given; a folder stands for the *.json files in it (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        out += sorted(p.glob("*.json")) if p.is_dir() else [p]
    return out


def read_parity(paths: Sequence[Path]) -> dict[str, dict[str, Any]]:
    """{model: {metric: value}} merged from metric files ({model: {metric: value}} each) or folders of them."""
    merged: dict[str, dict[str, Any]] = {}
    for path in metric_files(paths):
        data = read_json(path)
        if not all(isinstance(v, Mapping) for v in data.values()):  # a flat file: its name is the model
            data = {Path(path).stem: data}
        for model, metrics in data.items():
            key = model
            if key in merged and any(merged[key].get(k, v) != v for k, v in metrics.items()):
                key = f"{model} ({Path(path).parent.name}/{Path(path).name})"  # same model, other figures: keep both
            merged.setdefault(key, {}).update(metrics)
    return merged


def _sort_key(row: Mapping[str, Any]) -> tuple:
    b = row["backend"]
    return (BACKEND_ORDER.index(b) if b in BACKEND_ORDER else len(BACKEND_ORDER), str(row["precision"]), int(row["threads"]))


def _records(df) -> list[dict[str, Any]]:
    rows = df.to_dict("records")
    return sorted(rows, key=_sort_key)


def checkpoint_lines(source: Mapping[str, Any]) -> list[str]:
    name = source.get("name", "?")
    if source.get("random_weights"):
        extra = ", ".join(f"{k} {fmt(source[k])}" for k in ("seed", "num_layers", "lm_head_scale") if k in source)
        return [f"- Checkpoint: `{name}`: random weights (source `{source.get('source')}`, {extra}); "
                f"tokenizer: {source.get('tokenizer', '?')}"]
    lines = [f"- Checkpoint: `{name}` (source `{source.get('source')}`)"]
    if source.get("repo_id"):
        lines.append(f"- Hub id: `{source['repo_id']}`, revision `{source.get('revision') or '?'}`")
    if source.get("path"):
        lines.append(f"- Path: `{source['path']}`")
    return lines


def headline_tables(metrics: Mapping[str, Any]) -> str:
    """Benchmark metrics as tables: nested metrics keyed by the same names (configurations, backends)
    share a table with one row per name and one column per metric; scalars go on one line."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for name, value in metrics.items():
        if isinstance(value, Mapping):
            groups.setdefault(tuple(value), []).append(name)
    parts = []
    for keys, names in groups.items():
        if not keys:
            parts.append(", ".join(f"{n}: -" for n in names))
            continue
        parts.append(md_table(["", *names], ([k, *(metrics[n].get(k) for n in names)] for k in keys)))
    scalars = {k: v for k, v in metrics.items() if not isinstance(v, Mapping)}
    if scalars:
        parts.append(", ".join(f"{k}: {fmt(v)}" for k, v in scalars.items()))
    return "\n\n".join(parts)


def by_metric_tables(data: Mapping[str, Mapping[str, Any]]) -> str:
    """{model: {metric: value}} as tables with one row per metric and one column per model; models with
    the same metrics share a table (fp32 targets against torch, int8 targets against fp32, ...)."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for model, metrics in data.items():
        groups.setdefault(tuple(metrics), []).append(model)
    return "\n\n".join(
        md_table(["metric", *models], ([k, *(data[m].get(k) for m in models)] for k in keys))
        for keys, models in groups.items())


def build_markdown(
    rows: Sequence[Mapping[str, Any]],
    bench_metrics: Mapping[str, Any],
    parity: Mapping[str, Mapping[str, Any]],
    source: Mapping[str, Any],
    env: Environment,
    images: Sequence[str] = (XRT_PNG, BREAKDOWN_PNG),
    convert: Mapping[str, Mapping[str, Any]] | None = None,
    serve: Sequence[Mapping[str, Any]] | None = None,
    peer: Mapping[str, Any] | None = None,
    serve_open: Sequence[Mapping[str, Any]] = (),
) -> str:
    out: list[str] = ["# Soprano CPU inference report", ""]
    if source.get("random_weights"):
        out += [f"> {RANDOM_WEIGHTS_LINE}", ""]
    tokens = sorted({r["max_new_tokens"] for r in rows if r["backend"] != "upstream"
                     and not (isinstance(r["max_new_tokens"], float) and math.isnan(r["max_new_tokens"]))})
    out += ["## Setup", ""]
    out += checkpoint_lines(source)
    cores = f"{fmt(env.logical_cpus)} logical CPUs" + (f", {fmt(env.physical_cores)} physical cores" if env.physical_cores else "")
    out += [
        f"- CPU: {env.cpu}; {cores}",
        "- Libraries: " + ", ".join(f"{k} {v}" for k, v in env.libraries.items()) + f"; Python {env.python}",
        (f"- Benchmark run: {env.date}" if env.origin == "benchmark" else
         f"- Date: {env.date} (CPU, libraries and date read where this report was built: the benchmark's own record, "
         f"{ENV_JSON}, was not given)"),
        "- Token count: fixed at " + ", ".join(fmt(t) for t in tokens) + " new tokens per synthesis "
        "(max_new_tokens; random weights never emit [STOP]); upstream's generate is held to the same count. "
        "RTF = wall / audio duration (below 1 is faster than real time); x real time = audio / wall. "
        "Each configuration ran in its own process; figures are from the median of the repeats (by wall time) after "
        "a warm-up, per-token percentiles over all repeats. Where a row's note says 'best of N passes', the sweep "
        "ran N times (alternating order) and the row is its fastest pass, with the lowest first-chunk latency and "
        "the highest batch x real time of any pass, and the highest peak RSS.",
        "",
    ]
    loads = [float(r["load_avg"]) for r in rows if not math.isnan(float(r.get("load_avg", math.nan)))]
    if loads and env.logical_cpus and max(loads) >= env.logical_cpus:
        out += [f"> **The machine was busy while benchmarking:** 1-minute load average up to {fmt(max(loads))} on "
                f"{fmt(env.logical_cpus)} logical CPUs when a configuration started (column `load average` below). "
                "Other processes competed for the cores, so timings are noisy, multi-thread ones most; compare with care.",
                ""]
    threads = bench_metrics.get("threads")
    out += [f"## Headline (threads = {fmt(threads)})", ""]
    out += ["From the benchmark metrics (metrics/bench.json): per configuration at this thread count, the best "
            "x real time per backend, and int8 over fp32 x real time per backend.", "",
            headline_tables(bench_metrics), ""]

    out += recommendation_lines(rows, parity, env, threads)
    out += upstream_lines(rows)
    out += per_token_lines(rows)
    out += ["## Real-time factor by backend, precision and threads", "",
            "Speedups are x real time over the PyTorch reference at the same thread count, and over fp32 of the "
            "same backend and threads.", "",
            columns_table(rows, RTF_TABLE), ""]
    out += ["## Per-stage times", "",
            "One synthesis: the median of the repeats by wall time, so the stages add up to the wall time. "
            "Per token: one LM decode step (choosing the token and its forward pass). "
            "Other: text front end, tokenizer and glue (wall minus LM, decoder and ISTFT). "
            "Upstream's LM is not split into prefill and decode, and its decoder time includes the ISTFT.", "",
            columns_table(rows, STAGE_TABLE), ""]
    out += ["## Runs", "", columns_table(rows, RUN_TABLE), ""]
    out += ["## Parity (exported vs torch reference)", ""]
    if parity:
        out += [by_metric_tables(parity), ""]
    else:
        out += ["No parity metrics found.", ""]
    if convert:
        out += ["## Conversion (time and size per converted target)", "", by_metric_tables(convert), ""]
    if serve:
        out += serve_lines(serve, rows, serve_open)
    if peer:
        out += peer_lines(peer)
    out += ["## Plots", ""]
    out += [f"![x real time by backend and threads]({images[0]})", "", f"![per-stage time breakdown]({images[1]})", ""]
    return "\n".join(out)


def _choice_label(row: Mapping[str, Any]) -> str:
    """A benchmark row's registry.Choice label: its config without the thread suffix."""
    return str(row.get("config", "")).rsplit("-t", 1)[0]


def quality_passed(parity: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """{target label: verdict} for every registered target: "passed" where its parity_convert metrics are
    there and checked and the certificate passed (certificate_passed 0: a trained checkpoint's quality miss;
    a guard miss fails the stage, leaving no metrics), else why not."""
    out = {}
    for t in TARGETS.values():
        m = parity.get(f"{t.backend}_{t.precision}")
        if m is None:
            out[t.label] = "no parity metrics"
        elif any(k.startswith("skipped") for k in m):
            out[t.label] = "not checked on this CPU (" + ", ".join(k for k in m if k.startswith("skipped")) + ")"
        elif m.get("certificate_passed", 1.0) == 0.0:
            out[t.label] = "missed the quality limits for a trained checkpoint (certificate failed)"
        else:
            out[t.label] = "passed"
    return out


def recommendation_lines(rows: Sequence[Mapping[str, Any]], parity: Mapping[str, Mapping[str, Any]],
                         env: Environment, threads: Any) -> list[str]:
    """Per objective (pipeline_lib.recommend.OBJECTIVES): the fastest configuration at `threads` whose
    models all passed quality, and what the runtime's precision="auto" rule picks for the benchmark
    machine's CPU class among the configurations benchmarked here; whether the two agree."""
    if threads is None:
        return []
    verdicts = quality_passed(parity)
    at = [dict(r, choice=_choice_label(r)) for r in rows
          if r["backend"] not in REFERENCES and int(r["threads"]) == int(threads)]
    passed = []
    for r in at:
        try:
            c = registry.choice(r["choice"])
        except InputError:
            continue
        if all(verdicts.get(t.label) == "passed" for t in c.targets):
            passed.append(c.label)
    if not passed:
        return []
    flags = env.features()
    cls = recommend.cpu_class(flags)
    table = []
    for objective in recommend.OBJECTIVES:
        key = recommend.OBJECTIVE_COLUMNS[objective][0]
        best = recommend.fastest(at, objective, passed)
        measured = {r["choice"]: r for r in at}
        rule_pick = next((c.label for c in recommend.rule(cls, objective)
                          if c.label in passed and recommend.runnable(c, flags) is None), None)
        if best is None:
            continue
        if rule_pick is None:
            verdict = "the rule names none of the configurations measured here"
        elif rule_pick == best["choice"]:
            verdict = "agree"
        else:
            other = measured.get(rule_pick, {}).get(key)
            verdict = f"differ: the rule's pick measured {fmt(other)}"
        table.append([recommend.OBJECTIVE_NAMES[objective], best["choice"], fmt(best[key]), rule_pick or "-", verdict])
    excluded = sorted(f"{label} ({why})" for label, why in verdicts.items() if why != "passed")
    return [f"## Recommendation (threads = {fmt(threads)})", "",
            f"For the benchmark's machine ({env.cpu}; CPU class `{cls}` in pipeline_lib.recommend): the fastest "
            "configuration whose models all passed their quality checks (parity_convert: hidden-state cosine, "
            "teacher-forced top-1, decoder SNR, log-mel distance against fp32), per objective, beside what "
            "`SopranoTTS.from_dir(ROOT, precision=\"auto\", objective=...)` and `soprano-onnx speak --precision auto` "
            "pick on a CPU of this class from the same configurations. A pair LM+DECODER takes the LM of the first "
            "target and the decoder of the second. One run on a shared machine is one sample: close figures can "
            "swap places between runs.", "",
            md_table(["objective", "fastest measured", "figure", "rule for this CPU class", "verdict"], table), "",
            "Not in the running: " + ("; ".join(excluded) if excluded else "none") + ". "
            "int4's limits (conf/parity/default.yaml, convert_int4) only catch a broken conversion on random "
            "weights: judge int4 on a trained checkpoint before relying on it. Parity runs where the pipeline "
            "runs: a bf16 model skipped there is out of the running even if the benchmark ran elsewhere.", ""]


# (what, CSV column, higher is better, target ratio to upstream): the performance targets of the
# project's issue on batched synthesis, first-audio latency and memory.
UPSTREAM_TARGETS = (
    ("one sentence, x real time", "xrt", True, {"fp32": 2.5, "int8": 5.0}),
    ("eight sentences (infer_batch), x real time", "batch8_xrt", True, {"": 4.0}),
    ("streaming first chunk, ms", "first_chunk_ms", False, {"": 0.25}),
    ("peak RSS, MiB", "peak_rss_mb", False, {"onnx:fp32": 0.5}),
)  # target keys: "backend:precision", then "precision", then "" (any configuration)


def upstream_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Each runtime configuration against upstream at upstream's thread count, as ratios (ours over
    upstream's), with the target where there is one. Empty without an upstream row."""

    def num(r: Mapping[str, Any], key: str) -> float:
        v = r.get(key)
        try:
            return float("nan") if v is None else float(v)
        except (TypeError, ValueError):
            return float("nan")

    ups = [r for r in rows if r["backend"] == "upstream" and not math.isnan(num(r, "xrt"))]
    if not ups:
        return []
    up = ups[0]
    threads = int(up["threads"])
    ours = [r for r in rows if r["backend"] in BACKENDS and int(r["threads"]) == threads]
    table = []
    for what, key, higher, targets in UPSTREAM_TARGETS:
        base = num(up, key)
        if math.isnan(base) or base == 0:
            continue
        for r in ours:
            value = num(r, key)
            if math.isnan(value):
                continue
            ratio = value / base
            target = next((targets[k] for k in (f"{r['backend']}:{r['precision']}", r["precision"], "")
                           if k in targets), None)
            if target is None:
                verdict = "-"
            else:
                verdict = "met" if (ratio >= target if higher else ratio <= target) else "not met"
            goal = "-" if target is None else (f">= {fmt(target)}" if higher else f"<= {fmt(target)}")
            table.append([what, f"{BACKEND_NAMES.get(r['backend'], r['backend'])} {r['precision']}", fmt(value),
                          fmt(base), fmt(ratio), goal, verdict])
    if not table:
        return []
    return [f"## Against upstream (threads = {threads}, same run)", "",
            "Ours over upstream's figure in this run (x real time: higher is better; first chunk and RSS: lower "
            "is better), and the project's target for that ratio where one is set. Timings on a shared machine "
            "are noisy: one run is one sample.", "",
            md_table(["figure", "configuration", "ours", "upstream", "ratio", "target", "verdict"], table), ""]


# Per-token targets of the project's OpenVINO issue: int8 over fp32 on the same backend, and
# OpenVINO against ONNX Runtime at equal precision and threads (ratio of per-token medians).
INT8_SPEEDUP_TARGET = 1.7
OPENVINO_OVER_ONNX_TARGET = 1.0


def per_token_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The per-token LM latency targets, per thread count: int8 over fp32 per backend (>= 1.7) and
    OpenVINO over ONNX Runtime per precision (<= 1.0). Empty without two configurations to compare."""

    def per_token(backend: str, precision: str, threads: int) -> float:
        for r in rows:
            if r["backend"] == backend and r["precision"] == precision and int(r["threads"]) == threads:
                try:
                    return float(r.get("per_token_median_ms"))
                except (TypeError, ValueError):
                    return math.nan
        return math.nan

    table = []
    for threads in sorted({int(r["threads"]) for r in rows if r["backend"] in BACKENDS}):
        pairs = [(f"{BACKEND_NAMES[b]}: fp32 over int8", (b, "fp32"), (b, "int8"), INT8_SPEEDUP_TARGET, True)
                 for b in BACKENDS]
        pairs += [(f"{p}: OpenVINO over ONNX Runtime", ("openvino", p), ("onnx", p), OPENVINO_OVER_ONNX_TARGET, False)
                  for p in PRECISIONS]
        for what, num, den, target, higher in pairs:
            a, b = per_token(*num, threads), per_token(*den, threads)
            if math.isnan(a) or math.isnan(b) or b == 0:
                continue
            ratio = a / b
            verdict = "met" if (ratio >= target if higher else ratio <= target) else "not met"
            table.append([what, fmt(threads), fmt(a), fmt(b), fmt(ratio),
                          (">= " if higher else "<= ") + fmt(target), verdict])
    if not table:
        return []
    return ["## Per-token LM latency targets", "",
            "Per token median (ms, one LM decode step) of two configurations at the same thread count, and their "
            "ratio: fp32 over int8 on one backend (the int8 speedup), and OpenVINO over ONNX Runtime at one precision "
            "(below 1: OpenVINO is faster). Each configuration ran in its own process; on a shared machine one run is "
            "one sample (`python scripts/lm_step_latency.py --isolated` repeats the comparison in alternating "
            "processes).", "",
            md_table(["figure", "threads", "first (ms)", "second (ms)", "ratio", "target", "verdict"], table), ""]


def peer_lines(peer: Mapping[str, Any]) -> list[str]:
    """The section "What a user would pick instead": the peer stage's metrics (pipeline_lib.bench.peer),
    ONNX Runtime GenAI's builder int4 LM step beside ours, or why it was skipped. Reported, not gated."""
    out = ["## What a user would pick instead: ONNX Runtime GenAI (LM step, same run)", ""]
    if "skipped" in peer:
        return out + [f"Not measured: {peer['skipped']}.", ""]
    out += [f"ONNX Runtime GenAI's model builder on the same checkpoint (int4 MatMulNBits, block {fmt(peer['block_size'])}, "
            f"hidden states as an output), its Generator loop, against our LM ({peer['ours']}) in the runtime's loop: "
            f"one row, a {fmt(peer['prompt_tokens'])}-token prompt, {fmt(peer['steps'])} greedy steps, "
            f"{fmt(peer['threads'])} threads, each engine in a fresh process, {fmt(peer['rounds'])} alternating rounds "
            "(medians; the ratio is the median of the per-round ratios; below 1: ours is faster).", "",
            md_table(["engine", "ms per decode step", "rounds (ms)"],
                     [["ours (onnx-int4)", fmt(peer["ours_ms"]), " ".join(f"{v:.2f}" for v in peer["ours_all"])],
                      ["ONNX Runtime GenAI int4", fmt(peer["peer_ms"]), " ".join(f"{v:.2f}" for v in peer["peer_all"])]]),
            "", f"Ours over GenAI: **{fmt(peer['ratio'])}**.", ""]
    return out


def build_report(
    bench_csv: Path,
    bench_metrics: Path,
    parity_files: Sequence[Path],
    source_json: Path,
    out_dir: Path,
    env: Environment | None = None,
    convert_files: Sequence[Path] = (),
    env_json: Path | None = None,
    serve_csv: Path | None = None,
    peer_json: Path | None = None,
    serve_open_csv: Path | None = None,
) -> Path:
    """Write out_dir/report.md, out_dir/xrt_by_backend.png and out_dir/stage_breakdown.png. The
    environment: `env`, else the benchmark's record `env_json` (ENV_JSON), else read here."""
    import pandas as pd

    from pipeline_lib.fsutil import atomic_file

    if env is None:  # first: a bad record fails before anything is written
        env = Environment.from_json(env_json) if env_json is not None else Environment.here()
    rows = _records(pd.read_csv(bench_csv))
    metrics = read_json(bench_metrics)
    parity = read_parity(list(parity_files))
    source = read_json(source_json)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, plot in ((XRT_PNG, plot_xrt), (BREAKDOWN_PNG, plot_breakdown)):
        with atomic_file(out_dir / name) as tmp:
            plot(rows, tmp)
    convert = read_parity(list(convert_files))  # same shape: {target: {figure: value}}
    serve = pd.read_csv(serve_csv, keep_default_na=False, na_values=[""]).to_dict("records") if serve_csv else None
    serve_open = (pd.read_csv(serve_open_csv, keep_default_na=False, na_values=[""]).to_dict("records")
                  if serve_open_csv else [])
    peer = read_json(peer_json) if peer_json is not None and Path(peer_json).is_file() else None
    text = build_markdown(rows, metrics, parity, source, env, convert=convert, serve=serve, peer=peer,
                          serve_open=serve_open)
    with atomic_file(out_dir / "report.md") as tmp:
        tmp.write_text(text)
    return out_dir / "report.md"
