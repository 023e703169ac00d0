"""ISTFT postprocess: NumPy path vs torch.istft and the upstream soprano ISTFT; layouts; config I/O."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline_lib.audio.istft import (
    IstftConfig,
    IstftConfigError,
    istft,
    spectral_frames_to_complex,
)

SOPRANO = IstftConfig.for_n_fft(2048, 512, sample_rate=32000, samples_per_token=2048, upscale_factor=4)
TOL = 1e-5  # max abs error relative to the reference's peak


def random_spectrum(B: int, T: int, seed: int = 0, F: int = 1025) -> np.ndarray:
    """Like the decoder head: mag = min(exp(logmag), 100), S = mag * (cos p + i sin p); complex64."""
    rng = np.random.default_rng(seed)
    logmag = rng.normal(0.0, 1.5, (B, F, T))
    phase = rng.uniform(-np.pi, np.pi, (B, F, T))
    mag = np.minimum(np.exp(logmag), 100.0)
    return (mag * (np.cos(phase) + 1j * np.sin(phase))).astype(np.complex64)


def to_bftc(S: np.ndarray) -> np.ndarray:
    return np.stack([S.real, S.imag], axis=-1)


def rel_err(y: np.ndarray, ref: np.ndarray) -> float:
    assert y.shape == ref.shape, (y.shape, ref.shape)
    return float(np.abs(y.astype(np.float64) - ref).max() / np.abs(ref).max())


def test_for_n_fft_defaults() -> None:
    c = SOPRANO
    assert (c.n_fft, c.hop_length, c.win_length, c.window) == (2048, 512, 2048, "hann_periodic")
    assert c.center and not c.normalized and c.onesided and c.length is None
    assert c.zeroed_bins == (0, 1024) and c.n_bins == 1025 and c.spectral_layout == "B,F,T,2"
    assert c.num_samples(4 * (10 - 1) + 1) == 9 * 2048  # (n-1) tokens of audio


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("T", [2, 5, 33])
def test_numpy_matches_torch_istft(B: int, T: int) -> None:
    torch = pytest.importorskip("torch")
    S = random_spectrum(B, T, seed=B * 100 + T)
    y = istft(to_bftc(S), SOPRANO)
    assert y.dtype == np.float32 and y.shape == (B, 512 * (T - 1))
    St = torch.from_numpy(S.copy())
    St[:, 0] = 0
    St[:, -1] = 0
    ref = torch.istft(St, 2048, 512, 2048, torch.hann_window(2048), center=True).numpy()
    assert rel_err(y, ref) <= TOL
    assert rel_err(istft(S, SOPRANO, use_torch=True), ref) <= TOL


@pytest.mark.parametrize("T", [2, 5, 33])
def test_matches_upstream_soprano_istft(T: int) -> None:
    torch = pytest.importorskip("torch")
    spectral_ops = pytest.importorskip("soprano.vocos.spectral_ops")
    S = random_spectrum(2, T, seed=T)
    oracle = spectral_ops.ISTFT(n_fft=2048, hop_length=512, win_length=2048, padding="center")
    with torch.no_grad():
        ref = oracle(torch.from_numpy(S.copy())).numpy()  # it zeroes bins in place: give it a copy
    assert rel_err(istft(to_bftc(S), SOPRANO), ref) <= TOL


def test_float64_input_is_float32_out_and_closer() -> None:
    torch = pytest.importorskip("torch")
    S = random_spectrum(1, 9).astype(np.complex128)
    St = torch.from_numpy(S.copy())
    St[:, 0] = St[:, -1] = 0
    ref = torch.istft(St, 2048, 512, 2048, torch.hann_window(2048, dtype=torch.float64), center=True).numpy()
    y = istft(S, SOPRANO)
    assert y.dtype == np.float32 and rel_err(y, ref) <= 1e-6


def test_layouts_agree_and_input_untouched() -> None:
    S = random_spectrum(2, 7)
    bftc = to_bftc(S)
    bcft = np.ascontiguousarray(np.moveaxis(bftc, -1, 1))
    before = bftc.copy()
    y = istft(bftc, SOPRANO)
    np.testing.assert_array_equal(y, istft(bcft, SOPRANO))
    np.testing.assert_array_equal(y, istft(S, SOPRANO))
    np.testing.assert_array_equal(y, istft(bftc[:, :, ::-1][:, :, ::-1], SOPRANO))  # strided input
    np.testing.assert_array_equal(bftc, before)  # zeroing bins must not write into the caller's array
    C = spectral_frames_to_complex(bcft, SOPRANO)
    assert C.shape == (2, 1025, 7) and not C[:, [0, 1024]].any()
    np.testing.assert_array_equal(C[:, 1:1024], S[:, 1:1024])


def test_zeroed_bins_ignored() -> None:
    S = random_spectrum(1, 6)
    S2 = S.copy()
    S2[:, 0] = 1e3 + 5e2j
    S2[:, 1024] = -7e2 + 3j
    np.testing.assert_array_equal(istft(S, SOPRANO), istft(S2, SOPRANO))
    np.testing.assert_array_equal(istft(S, SOPRANO, use_torch=True), istft(S2, SOPRANO, use_torch=True))
    # and they would matter if not zeroed
    plain = IstftConfig(**{**SOPRANO.to_dict(), "zeroed_bins": []})
    assert not np.array_equal(istft(S, plain), istft(S2, plain))


@pytest.mark.parametrize(
    "shape",
    [(1, 1025, 5), (1, 1024, 5, 2), (1, 2, 1024, 5), (1, 1025, 5, 3), (1, 1025, 0, 2), (1025, 5, 2)],
)
def test_invalid_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"\[B, F, T, 2\] or \[B, 2, F, T\]") as e:
        istft(np.zeros(shape, np.float32), SOPRANO)
    assert str(shape) in str(e.value)


def test_ambiguous_shape() -> None:
    tiny = IstftConfig.for_n_fft(2, 1, sample_rate=8, samples_per_token=4, upscale_factor=4)  # F = 2
    with pytest.raises(ValueError, match=r"ambiguous.*\[B, F, T, 2\] or \[B, 2, F, T\]"):
        istft(np.zeros((1, 2, 2, 2), np.float32), tiny)


def test_one_frame_is_empty_and_length_respected() -> None:
    S = random_spectrum(2, 1)
    for use_torch in (False, True):
        assert istft(S, SOPRANO, use_torch=use_torch).shape == (2, 0)
    S = random_spectrum(1, 9)
    full = istft(S, SOPRANO)
    cut = IstftConfig(**{**SOPRANO.to_dict(), "length": 1000})
    y = istft(S, cut)
    assert y.shape == (1, 1000)
    np.testing.assert_allclose(y, full[:, :1000], rtol=0, atol=1e-6 * np.abs(full).max())
    np.testing.assert_allclose(istft(S, cut, use_torch=True), y, rtol=0, atol=TOL * np.abs(y).max())
    # Past the signal end the envelope reaches ~0 before the padding: torch.istft rejects it, so do we.
    with pytest.raises(ValueError, match="NOLA"):
        istft(S, IstftConfig(**{**SOPRANO.to_dict(), "length": full.shape[1] + 2000}))


def test_other_settings_match_torch() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    base = IstftConfig.for_n_fft(64, 16, sample_rate=8000, samples_per_token=64, upscale_factor=4)
    for kw in ({"normalized": True}, {"win_length": 48}, {"hop_length": 24, "samples_per_token": 96},
               {"zeroed_bins": []}):
        c = IstftConfig(**{**base.to_dict(), **kw})
        S = (rng.normal(size=(2, 33, 12)) + 1j * rng.normal(size=(2, 33, 12))).astype(np.complex64)
        S[:, [0, 32]] = S[:, [0, 32]].real  # torch's irfft ignores imag of DC/Nyquist: keep it out
        assert rel_err(istft(S, c), istft(S, c, use_torch=True)) <= TOL, kw


def test_config_json_round_trip(tmp_path: Path) -> None:
    p = tmp_path / "istft.json"
    SOPRANO.to_json(p)
    assert json.loads(p.read_text())["zeroed_bins"] == [0, 1024]
    assert IstftConfig.from_json(p) == SOPRANO
    assert IstftConfig.from_dict(SOPRANO.to_dict()) == SOPRANO


def test_config_errors(tmp_path: Path) -> None:
    d = SOPRANO.to_dict()
    with pytest.raises(ValueError, match=r"unknown keys \['bogus'\], missing keys \['hop_length'\]"):
        IstftConfig.from_dict({**{k: v for k, v in d.items() if k != "hop_length"}, "bogus": 1})
    for bad in ({"window": "hamming"}, {"zeroed_bins": [1025]}, {"samples_per_token": 1000},
                {"center": 1}, {"spectral_layout": "B,T,F,2"}, {"win_length": 4096}):
        with pytest.raises(ValueError):
            IstftConfig.from_dict({**d, **bad})
    p = tmp_path / "broken.json"
    p.write_text("{not json")
    with pytest.raises(IstftConfigError, match="broken.json"):
        IstftConfig.from_json(p)
    p.write_text(json.dumps({**d, "extra": 1}))
    with pytest.raises(ValueError, match=r"broken.json.*unknown keys \['extra'\]"):
        IstftConfig.from_json(p)
    with pytest.raises(IstftConfigError, match="missing.json"):
        IstftConfig.from_json(tmp_path / "missing.json")


def test_numpy_path_never_imports_torch() -> None:
    code = (
        "import sys, numpy as np\n"
        "from pipeline_lib.audio.istft import IstftConfig, istft\n"
        "c = IstftConfig.for_n_fft(2048, 512, 32000, 2048, 4)\n"
        "y = istft(np.ones((1, 1025, 5, 2), np.float32), c)\n"
        "assert y.shape == (1, 2048)\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_speed_print() -> None:
    """Not asserted: NumPy vs torch for one 200-token sentence (T = 4*(200-1)+1 frames)."""
    pytest.importorskip("torch")
    spec = to_bftc(random_spectrum(1, 4 * (200 - 1) + 1))

    def ms(use_torch: bool) -> float:
        istft(spec, SOPRANO, use_torch=use_torch)
        t = time.perf_counter()
        for _ in range(10):
            istft(spec, SOPRANO, use_torch=use_torch)
        return (time.perf_counter() - t) / 10 * 1e3

    print(f"\nistft B=1 T=797: numpy {ms(False):.2f} ms, torch {ms(True):.2f} ms")
