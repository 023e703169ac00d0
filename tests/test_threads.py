"""The thread default (cpuinfo.default_threads): physical cores among the CPUs of the affinity mask (SMT
siblings once), within the cgroup CPU quota; used by SopranoTTS, speak, bench and serve."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline_lib import cpuinfo


def _topology(root: Path, cores: dict[int, tuple[int, int]]) -> Path:
    for cpu, (pkg, core) in cores.items():
        d = root / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "physical_package_id").write_text(f"{pkg}\n")
        (d / "core_id").write_text(f"{core}\n")
    return root


def test_physical_cores_counts_smt_siblings_once(tmp_path):
    sysfs = _topology(tmp_path, {0: (0, 0), 1: (0, 1), 2: (0, 0), 3: (0, 1), 4: (1, 0), 5: (1, 0)})
    assert cpuinfo.physical_cores({0, 1, 2, 3, 4, 5}, sysfs) == 3
    assert cpuinfo.physical_cores({0, 2}, sysfs) == 1          # affinity: two siblings of one core
    assert cpuinfo.physical_cores({7}, sysfs) == 1             # no topology: its own core


def test_cgroup_quota_v2_and_v1(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cpuinfo.cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpuinfo.cgroup_cpu_limit(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpuinfo.cgroup_cpu_limit(v1) == 3.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpuinfo.cgroup_cpu_limit(v1) is None


def test_default_threads_is_the_smaller_of_cores_and_quota(monkeypatch):
    monkeypatch.setattr(cpuinfo, "physical_cores", lambda: 8)
    monkeypatch.setattr(cpuinfo, "cgroup_cpu_limit", lambda: 2.5)
    assert cpuinfo.default_threads() == 3
    monkeypatch.setattr(cpuinfo, "cgroup_cpu_limit", lambda: 0.2)
    assert cpuinfo.default_threads() == 1
    monkeypatch.setattr(cpuinfo, "cgroup_cpu_limit", lambda: None)
    assert cpuinfo.default_threads() == 8
    assert 1 <= cpuinfo.default_threads() <= 8


def test_commands_and_runtime_default_to_it(tiny_export, monkeypatch):
    from pipeline_lib.cli import build_parser
    from pipeline_lib.runtime.tts import SopranoTTS

    parser = build_parser()
    for argv in (["speak", "x", "-o", "o.wav", "--model", "m"], ["serve", "--model", "m"],
                 ["bench", "--backend", "onnx", "--lm", "a", "--decoder", "b"]):
        args = parser.parse_args(argv)
        assert getattr(args, "threads") is None, argv  # resolved to default_threads() when run
    monkeypatch.setattr("pipeline_lib.runtime.tts.default_threads", lambda: 1)
    tts = SopranoTTS.from_dir(tiny_export, warm_up=False)
    assert tts.num_threads == 1
    assert cpuinfo.default_threads() <= cpuinfo.available_cpus()
