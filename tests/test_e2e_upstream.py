"""End-to-end parity against upstream `soprano-tts` (the oracle) on the tiny checkpoint.

Upstream runs the checkpoint with transformers (greedy = temperature 0.001 + top_p 0.95 sampling,
512 new tokens per sentence since a random LM never emits [STOP]) and its torch decoder; we run the
exported ONNX files with `SopranoTTS.synthesize` (true greedy). The tiny checkpoint's LM head is
sharpened (docs/design.md), so both pick the same tokens and the audio must agree to 1e-3 of its peak.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("soprano.tts")
torch = pytest.importorskip("torch")

TEXTS = [
    "Dr. Smith paid $12.50 for 3 apples on Jan. 5th. Then he left at 10:30 AM!",
    "Hello world!",
    "The 2nd meeting, on 3/14/2025, starts at 9 a.m. sharp; please bring your notes.",
]


@pytest.fixture(scope="module")
def upstream(tiny_checkpoint):
    from soprano.tts import SopranoTTS as UpstreamTTS

    torch.manual_seed(0)
    return UpstreamTTS(device="cpu", backend="transformers", model_path=str(tiny_checkpoint))  # runs a warmup


@pytest.fixture(scope="module")
def ours(tiny_export):
    from pipeline_lib import SopranoTTS

    return SopranoTTS.from_dir(tiny_export, num_threads=2)


def _check(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.dtype == np.float32
    assert len(got) == len(ref), (len(got), len(ref))
    peak = float(np.abs(ref).max())
    assert peak > 0
    assert float(np.abs(got - ref).max()) <= 1e-3 * peak


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_synthesize_matches_upstream(upstream, ours, text):
    torch.manual_seed(0)
    ref = upstream.infer(text).numpy()
    result = ours.synthesize(text)
    assert result["sentences"] == len(upstream._preprocess_text([text]))
    _check(result["audio"], ref)


@pytest.mark.slow
def test_infer_batch_matches_upstream(upstream, ours):
    texts = [TEXTS[1], TEXTS[0]]
    torch.manual_seed(0)
    refs = [a.numpy() for a in upstream.infer_batch(texts)]
    for got, ref in zip(ours.infer_batch(texts), refs):
        _check(got, ref)
