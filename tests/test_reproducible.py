"""Byte-reproducible builds: the same inputs give the same bytes, for the export and every target that
converts here. Each build runs in its own process, as each DVC stage does (OpenVINO names the nodes it
creates from a process-wide counter, so two conversions in one process differ in those names only; see
docs/design.md, "Reproducible artifacts")."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline_lib import registry

pytestmark = pytest.mark.slow


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _cli(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pipeline_lib.cli", *args], capture_output=True, text=True,
                          timeout=900, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, f"{args}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _differ(a: dict[str, str], b: dict[str, str]) -> list[str]:
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def test_export_twice_gives_the_same_bytes(tiny_checkpoint, tmp_path):
    for i in (1, 2):
        _cli("export", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / f"e{i}"))
    a, b = tree_hashes(tmp_path / "e1"), tree_hashes(tmp_path / "e2")
    assert len(a) >= 5 and _differ(a, b) == []


@pytest.mark.parametrize("label", [t.label for t in registry.TARGETS.values()])
def test_convert_twice_gives_the_same_bytes(label, tiny_checkpoint, tiny_export, tmp_path):
    target = next(t for t in registry.TARGETS.values() if t.label == label)
    if target.backend == "openvino":
        pytest.importorskip("openvino")
        pytest.importorskip("nncf")
    extra = ["--checkpoint", str(tiny_checkpoint)] if registry.backend(target.backend).stateful_lm else []
    for i in (1, 2):
        _cli("convert", "--export", str(tiny_export), "--backend", target.backend, "--precision", target.precision,
             "--out", str(tmp_path / f"c{i}"), *extra)
    a, b = tree_hashes(tmp_path / "c1"), tree_hashes(tmp_path / "c2")
    assert any(k.startswith("lm/") for k in a) and any(k.startswith("decoder/") for k in a), a
    assert _differ(a, b) == [], f"{label}: files that differ between two conversions: {_differ(a, b)}"
    # no timing, host or build path in the configs
    host = os.uname().nodename
    for name in a:
        if name.endswith(".json"):
            text = (tmp_path / "c1" / name).read_text()
            assert '"seconds"' not in text and str(tmp_path) not in text, name
            assert len(host) < 6 or host not in text, name
