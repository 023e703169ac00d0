"""The peer row: ONNX Runtime GenAI's builder on the same checkpoint, timed beside ours; its report section."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pipeline_lib.bench.peer import PREFILL_FUNCTIONS, PeerResult, PeerSkipped, build_genai, compare
from pipeline_lib.report import peer_lines


def test_peer_lines_report_the_ratio_or_the_reason() -> None:
    res = PeerResult(2, 24, 200, 2, 3.0, 2.5, 1.2, (3.1, 2.9), (2.6, 2.4)).to_dict()
    text = "\n".join(peer_lines({**res, "block_size": 128, "ours": "artifacts/onnx/int4/lm"}))
    assert "What a user would pick instead" in text and "**1.2**" in text and "3.10 2.90" in text
    skipped = "\n".join(peer_lines({"skipped": "onnxruntime-genai is not installed"}))
    assert "Not measured: onnxruntime-genai is not installed." in skipped


def test_build_genai_names_a_bad_checkpoint(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime_genai")
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(PeerSkipped, match="builder failed"):
        build_genai(tmp_path / "ckpt", tmp_path / "out", timeout_s=300)


@pytest.mark.slow
def test_peer_builds_and_times_the_tiny_checkpoint(tiny_checkpoint: Path, tiny_export: Path, tmp_path: Path) -> None:
    """The builder accepts the checkpoint as the fetch stage writes it; both engines time the same steps."""
    pytest.importorskip("onnxruntime_genai")
    built = build_genai(tiny_checkpoint, tmp_path / "genai", "int4", 128, timeout_s=600)
    assert (built / "genai_config.json").is_file()
    res = compare(tiny_export, built, threads=1, prompt=8, steps=12, rounds=1, timeout_s=300)
    assert res.ours_ms > 0 and res.peer_ms > 0 and math.isfinite(res.ratio)
    # the prefill timers (scripts/llama_cpp_compare.py --prefill) run on both engines' folders
    for kind, folder in (("ours", tiny_export), ("genai", built)):
        ms, n = PREFILL_FUNCTIONS[kind](folder, 1, 16, 3)
        assert n == 3 and 0 < ms < 5000, (kind, ms)
