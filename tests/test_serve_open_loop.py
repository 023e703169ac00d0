"""The load benchmark's open loop and capacity (pipeline_lib.bench.serve_drivers / serve_summary /
capacity, issue 23 item 5): the seeded Poisson schedule, the capacity rule on synthetic levels (at
and just past each limit), the open-loop summary of hand-made requests, a live open level against our
tiny server, the CLI's argument checks, and the report's open-loop subsection."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pipeline_lib.bench import capacity as cap_rule
from pipeline_lib.bench import serve_load as sl

GEOMETRY = sl.AudioGeometry(32000, 2048)
TOKENS = 16


def test_poisson_schedule_is_seeded_and_has_the_rate_and_the_mix():
    s = sl.OpenLoopSettings(rates=(1.5,), level_s=4000.0, long_share=0.2, seed=7)
    sched = sl.arrival_schedule(1.5, s)
    assert sched == sl.arrival_schedule(1.5, s)  # reproducible
    assert sched != sl.arrival_schedule(1.5, sl.OpenLoopSettings(rates=(1.5,), level_s=4000.0, seed=8))
    times = np.array([t for t, _ in sched])
    assert (np.diff(times) > 0).all() and 0 < times[0] and times[-1] < s.level_s
    # ~6000 arrivals: the count's standard deviation is ~1.3% of it
    assert len(times) / s.level_s == pytest.approx(1.5, rel=0.04)
    gaps = np.diff(times)
    assert gaps.mean() == pytest.approx(1 / 1.5, rel=0.04)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.06)  # exponential gaps (evenly spaced: 0)
    long_ = set(s.long_indices())
    share = np.mean([i in long_ for _, i in sched])
    assert share == pytest.approx(0.2, abs=0.02)
    assert {i for _, i in sched} == set(range(len(s.texts)))  # every text is drawn
    # Another rate: the same arrivals and texts, closer together or further apart (common random numbers)
    slow = sl.arrival_schedule(0.5, s)
    assert len(slow) / s.level_s == pytest.approx(0.5, rel=0.06)
    assert [i for _, i in slow] == [i for _, i in sched[:len(slow)]]
    assert [t for t, _ in slow] == pytest.approx([3 * t for t, _ in sched[:len(slow)]])


def test_the_mix_is_mostly_short_and_the_long_texts_are_several_sentences():
    s = sl.OpenLoopSettings(rates=(1.0,))
    counts = [sl.sentence_count(t) for t in s.texts]
    assert all(counts[i] >= 4 for i in s.long_indices()) and all(counts[i] <= 2 for i in s.short_indices())
    assert len(s.long_indices()) >= 2 and s.long_share < 0.5
    # Mean audio: 0.8 x the short texts' mean + 0.2 x the long ones', each sentence 63 tokens x 2048 samples
    per_sentence = 63 * 2048 / 32000
    short = np.mean([counts[i] for i in s.short_indices()]) * per_sentence
    long_ = np.mean([counts[i] for i in s.long_indices()]) * per_sentence
    assert sl.mean_audio_s(s, GEOMETRY) == pytest.approx(0.8 * short + 0.2 * long_)
    rates = sl.rates_for_streams([4, 8], s, GEOMETRY)
    assert [r * sl.mean_audio_s(s, GEOMETRY) for r in rates] == pytest.approx([4, 8])


@pytest.mark.parametrize("kwargs, match", [({"rates": ()}, "rates"), ({"rates": (0.0,)}, "rates"),
                                           ({"rates": (1.0,), "long_share": 1.5}, "long_share"),
                                           ({"rates": (1.0,), "texts": ("One short sentence here, nothing more.",)},
                                            "long texts")])
def test_bad_open_loop_settings_are_named(kwargs, match):
    with pytest.raises(sl.InputError, match=match):
        sl.OpenLoopSettings(**kwargs)


def _level(rate, ttfa_p95, smooth, streams_per_rate=8.0):
    return {"rate_per_s": rate, "offered_streams": rate * streams_per_rate, "ttfa_p95_ms": ttfa_p95,
            "smooth_share": smooth}


def test_capacity_rule_at_and_just_past_each_limit():
    limit_ms, share = cap_rule.CAPACITY_TTFA_P95_MS, cap_rule.CAPACITY_SMOOTH_SHARE
    assert (limit_ms, share, cap_rule.STALL_LIMIT_S) == (300.0, 0.99, 0.1)  # the thresholds
    assert cap_rule.within_capacity(_level(1, limit_ms, share))
    assert not cap_rule.within_capacity(_level(1, limit_ms + 0.1, share))
    assert not cap_rule.within_capacity(_level(1, limit_ms, share - 0.0001))
    assert not cap_rule.within_capacity(_level(1, math.nan, 1.0))  # no request: says nothing

    rows = [_level(0.5, 120, 1.0), _level(1.0, 299.9, 0.995), _level(1.5, 300.1, 1.0), _level(2.0, 250, 1.0)]
    c = cap_rule.capacity(rows[::-1])  # order does not matter
    # 1.5 fails on TTFA by 0.1 ms: the capacity is 1.0 (2.0 passing above a failure is noise, not capacity)
    assert (c["rate_per_s"], c["streams"], c["bounded"], c["first_failing_rate_per_s"]) == (1.0, 8.0, True, 1.5)
    rows[2]["ttfa_p95_ms"] = 300.0
    assert cap_rule.capacity(rows)["rate_per_s"] == 2.0 and not cap_rule.capacity(rows)["bounded"]
    rows[1]["smooth_share"] = 0.9899  # one request in ~100 stalled too long at 1.0: the capacity drops to 0.5
    c = cap_rule.capacity(rows)
    assert (c["rate_per_s"], c["streams"], c["first_failing_rate_per_s"]) == (0.5, 4.0, 1.0)
    rows[0]["ttfa_p95_ms"] = 301.0
    c = cap_rule.capacity(rows)
    assert c["rate_per_s"] is None and c["streams"] is None and c["lowest_rate_per_s"] == 0.5
    assert "below the lowest rate measured, 0.5 requests/s" in cap_rule.describe(c)
    assert "1 requests/s = 8.0 real-time streams; 1.5 requests/s (12.0 streams) fails" in cap_rule.describe(
        cap_rule.capacity([_level(1.0, 100, 1.0), _level(1.5, 400, 1.0)]))


def _req(start, arrivals, error=None, text_index=0, total=None, status=200):
    r = sl.RequestResult(text_index, 0, start, status=status, error=error)
    r.arrivals = [(start + t, n) for t, n in arrivals]
    r.first_audio_s = arrivals[0][0] if arrivals else None
    r.total_s = total if total is not None else (arrivals[-1][0] if arrivals else 0.01)
    r.samples = arrivals[-1][1] if arrivals else 0
    return r


def test_open_summary_counts_stalls_over_the_limit_429s_and_cut_requests():
    """Rate 100 samples/s audio: 100 samples = 1 s. A smooth response, one with a single 150 ms stall,
    one with two 60 ms stalls (over the total but under the single-stall limit), a cut long request
    with a 500 ms stall so far, a cut one before any audio, and a 429."""
    reqs = [
        _req(0.0, [(0.05, 100), (1.05, 200)]),                        # smooth
        _req(0.5, [(0.1, 100), (1.25, 200)]),                         # waits 0.15 s once
        _req(1.0, [(0.1, 100), (1.16, 200), (2.22, 300)], text_index=9),  # two 0.06 s waits
        _req(1.2, [(0.2, 100), (1.7, 200)], error="cut", text_index=8, total=3.0),  # cut, waited 0.5 s
        _req(1.3, [], error="http_429", status=429),
        _req(1.4, [], error="cut", total=2.8),                         # cut before any audio: plays nothing
    ]
    level = sl.LevelResult(0, 0.0, 2.0, reqs, 0.5, finished=4.2, rate=2.5)
    row = sl.summarize_open_level(level, 100, long_texts={8, 9})
    assert (row["rate_per_s"], row["requests_sent"], row["requests_ok"], row["errors"], row["cut"]) == (2.5, 6, 3, 1, 2)
    assert row["rejected_429"] == 1 and row["errors_by_status"] == "429:1" and row["long_sent"] == 2
    assert row["requests_ok"] + row["errors"] + row["cut"] == row["requests_sent"]
    # Open at 1.3 s: requests 2 (0.5-1.75), 3 (1.0-3.22), 4 (1.2-4.2), 5 (1.3-1.31); 1 ended at 1.05, 6 starts at 1.4
    assert row["peak_in_flight"] == 4
    # Heard: 4 responses (3 complete + 1 cut), 2 with a single stall over 100 ms
    assert row["stalled_over_limit_share"] == pytest.approx(2 / 4)
    assert row["smooth_share"] == pytest.approx(2 / 6)  # the 429 and the request cut before any audio played nothing
    assert row["within_capacity"] == 0
    assert row["stall_p95_ms"] > 150 and row["ttfa_p50_ms"] > 0
    from pipeline_lib.bench.serve_summary import peak_in_flight

    assert peak_in_flight(reqs[:1]) == 1 and peak_in_flight([]) == 0


def test_longest_stall_is_the_single_longest_wait():
    from pipeline_lib.bench.serve_request import longest_stall_s

    arrivals = [(0.0, 100), (0.5, 200), (0.55, 400), (0.9, 500)]  # waits 0.4 and 0.1
    assert longest_stall_s(arrivals, 1000) == pytest.approx(0.4)
    assert sl.stall_s(arrivals, 1000) == pytest.approx(0.5)
    assert longest_stall_s([], 1000) == 0.0 and longest_stall_s([(0.0, 10_000)], 1000) == 0.0
    # Cut at 1.3 s: the listener ran out at 1.0 s (0.6 s of audio from 0.4 s on) and waits 0.3 s at the cut
    assert longest_stall_s([(0.4, 600)], 1000, until=1.3) == pytest.approx(0.3)
    assert longest_stall_s([(0.4, 600)], 1000, until=0.9) == 0.0 and longest_stall_s([], 1000, until=5.0) == 0.0


@pytest.mark.slow  # our server in its own process on the tiny export, one open level of a few seconds
def test_open_level_against_our_server_on_loopback(tiny_export, tmp_path):
    """Poisson arrivals against our real server: every request complete (length checked against the
    rule), the counts add up to the schedule, and sane figures in every column."""
    settings = sl.OpenLoopSettings(rates=(2.0,), level_s=3.0, drain_s=60.0, long_share=0.25, seed=3,
                                   max_new_tokens=TOKENS, warmup_requests=1)
    spec = sl.ours_spec(tiny_export, threads=1, max_batch=8, max_queue=32)
    geometry = sl.AudioGeometry.from_model_dir(tiny_export)
    rows, open_rows = sl.bench_server(spec, None, geometry, tmp_path / "ours.log", settings)
    assert rows == [] and len(open_rows) == 1
    row = open_rows[0]
    frame = sl.to_frame(open_rows, sl.OPEN_COLUMNS)
    assert list(frame.columns) == list(sl.OPEN_COLUMNS)
    schedule = sl.arrival_schedule(2.0, settings)
    long_ = set(settings.long_indices())
    assert row["requests_sent"] == len(schedule) >= 2
    assert row["long_sent"] == sum(i in long_ for _, i in schedule)
    assert row["requests_ok"] == row["requests_sent"] and row["errors"] == 0 and row["cut"] == 0, row
    assert row["rejected_429"] == 0 and row["errors_by_status"] == ""
    assert row["xrt"] > 0 and row["audio_s"] > 0 and 0 < row["ttfa_p50_ms"] <= row["ttfa_p95_ms"]
    assert row["ttfa_p95_ms"] <= row["latency_p95_ms"] and 0 <= row["stall_p50_ms"] <= row["stall_p95_ms"]
    assert 0 <= row["smooth_share"] <= 1 and 1 <= row["peak_in_flight"] <= row["requests_sent"]
    assert row["within_capacity"] == int(cap_rule.within_capacity(row))
    mean = sl.mean_audio_s(settings, geometry)
    assert row["offered_streams"] == pytest.approx(2.0 * mean) and row["mean_audio_s"] == pytest.approx(mean)
    assert row["server"] == "ours" and row["max_new_tokens"] == TOKENS and row["seed"] == 3
    assert "Poisson arrivals, seed 3" in row["note"]
    m = sl.headline([], open_rows)
    assert m["capacity"]["lowest_rate_per_s"] == 2.0 and set(m["open_loop"]["ttfa_p95_ms"]) == {"2"}


@pytest.mark.parametrize("argv, match", [
    (["--mode", "open", "--servers", "upstream"], "our server only"),
    (["--rates", "1"], "need --mode open"),
    (["--mode", "open", "--rates", "0"], "rates"),
    (["--mode", "open", "--rates", "1", "--streams", "4"], "not allowed with"),
    (["--mode", "open", "--plot", "x.png"], "closed loop"),
])
def test_cli_names_bad_open_loop_arguments(argv, match, tiny_export, capsys):
    with pytest.raises(SystemExit) as exc:
        sl.main(["--model", str(tiny_export), *argv])
    assert exc.value.code == 2 and match in capsys.readouterr().err


def sample_open_rows(ttfa95=(120.0, 240.0, 900.0)) -> list[dict]:
    rows = []
    for rate, t95, smooth, n429 in zip((0.5, 1.0, 1.5), ttfa95, (1.0, 1.0, 0.8), (0, 0, 3)):
        row = {c: math.nan for c in sl.OPEN_COLUMNS}
        row.update(server="ours", backend="onnx", precision="int8", threads=2, max_new_tokens=64,
                   response_format="pcm", max_batch=16, max_queue=64, rate_per_s=rate, mean_audio_s=8.0,
                   offered_streams=rate * 8.0, long_share=0.2, seed=0, level_s=20.0, requests_sent=int(20 * rate),
                   long_sent=int(4 * rate), requests_ok=int(20 * rate) - n429, errors=n429,
                   errors_by_status=f"429:{n429}" if n429 else "", rejected_429=n429, cut=0,
                   peak_in_flight=int(3 * rate) + 1, xrt=rate * 8.0, ttfa_p50_ms=t95 / 2, ttfa_p95_ms=t95,
                   latency_p95_ms=t95 + 5000, stall_p50_ms=0.0, stall_p95_ms=40.0 * rate,
                   stalled_over_limit_share=1 - smooth, smooth_share=smooth, settle_s=1.0, load_avg=1.2,
                   note="open")
        row["within_capacity"] = int(cap_rule.within_capacity(row))
        rows.append(row)
    return rows


def test_report_shows_the_open_loop_table_and_the_capacity():
    from pipeline_lib.report_serve import open_loop_lines, serve_lines

    lines = open_loop_lines(sample_open_rows())
    text = "\n".join(lines)
    assert lines[0] == "### Capacity (open loop)" and "Random weights" in text
    table = [line for line in text.splitlines() if line.startswith("| ours")]
    assert len(table) == 3 and table[0].startswith("| ours | 0.5 | 4 | 10 |") and "| 429:3 |" in table[2]
    assert "**1 requests/s = 8 real-time streams** (1.5 requests/s, 12 streams, fails the rule)" in text
    assert "at most 300 ms" in text and "at least 99%" in text and "over 100 ms" in text
    # Every rate passing: a lower bound; the lowest failing: below it
    assert "(every rate measured passed: the capacity is at least this)" in "\n".join(
        open_loop_lines(sample_open_rows()[:2]))
    assert "**below the lowest rate measured** (0.5 requests/s, 4 real-time streams offered" in "\n".join(
        open_loop_lines(sample_open_rows((400.0, 240.0, 900.0))))
    assert open_loop_lines([]) == []
    # In the section: after the closed loop's verdicts, before the plot
    from test_serve_bench import sample_serve_rows

    section = serve_lines(sample_serve_rows(), (), sample_open_rows())
    assert section.index("### Capacity (open loop)") > section.index("## Server under load")
    assert section[-2].startswith("![x real time")


def test_report_stage_reads_serve_open_csv(tmp_path):
    """build_report with serve_open.csv: the subsection is in report.md, from the CSV's rows."""
    import json

    from pipeline_lib.bench import COLUMNS as BENCH_COLUMNS
    from pipeline_lib.report import Environment, build_report
    from test_serve_bench import sample_serve_rows

    serve_csv, open_csv = tmp_path / "serve.csv", tmp_path / "serve_open.csv"
    sl.to_frame(sample_serve_rows()).to_csv(serve_csv, index=False, float_format="%.6g")
    sl.to_frame(sample_open_rows(), sl.OPEN_COLUMNS).to_csv(open_csv, index=False, float_format="%.6g")
    bench = {c: math.nan for c in BENCH_COLUMNS}
    bench.update(config="onnx-int8-t2", backend="onnx", precision="int8", threads=2, max_new_tokens=64, num_tokens=64,
                 xrt=9.0, rtf=1 / 9.0, audio_s=4.0, wall_s=4 / 9.0, first_chunk_ms=80.0, note="fixed")
    bench_csv = tmp_path / "bench.csv"
    pd.DataFrame([bench], columns=list(BENCH_COLUMNS)).to_csv(bench_csv, index=False)
    (tmp_path / "bench.json").write_text("{}")
    (tmp_path / "source.json").write_text(json.dumps({"name": "tiny", "random_weights": True}))
    env = Environment(cpu="Test CPU", logical_cpus=2, physical_cores=1, python="3.x", libraries={}, date="today")
    report = build_report(bench_csv, tmp_path / "bench.json", [], tmp_path / "source.json", tmp_path / "out", env=env,
                          serve_csv=serve_csv, serve_open_csv=open_csv).read_text()
    assert "### Capacity (open loop)" in report and "**1 requests/s = 8 real-time streams**" in report
