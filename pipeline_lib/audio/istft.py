"""Inverse STFT postprocess for the Soprano decoder's spectral output (torch.istft semantics, NumPy).

The decoder is exported to ONNX up to its complex spectrum; the ISTFT runs here so that the
runtime needs only NumPy. `use_torch=True` runs torch.istft with the same settings, as a cross-check.

Semantics (torch.istft, return_complex=False): zero `zeroed_bins`; inverse real FFT per frame
(1/n_fft scaling, times sqrt(n_fft) when `normalized`); multiply by the window (zero-padded to
n_fft, centred); overlap-add with `hop_length`; divide by the overlap-added squared window; with
`center`, drop n_fft//2 samples from both ends, so T frames give hop*(T-1) samples. T=1 gives
zero samples (torch.istft raises there instead: its NOLA check takes the min of an empty tensor).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from pipeline_lib.errors import MissingBackendError, ModelFileError

__all__ = [
    "IstftConfig",
    "IstftConfigError",
    "LAYOUTS",
    "istft",
    "spectral_frames_to_complex",
]

# The two real layouts an exported decoder may emit; complex [B, F, T] is accepted too.
LAYOUTS: tuple[str, ...] = ("B,F,T,2", "B,2,F,T")
WINDOWS: tuple[str, ...] = ("hann_periodic",)
NOLA_EPS = 1e-11  # torch.istft's threshold on the window envelope


EXPORT_METADATA_KEYS = ("onnx", "decoder")


class IstftConfigError(ModelFileError, ValueError):
    """An ISTFT config (dict or JSON file) is missing keys, has unknown keys or bad values."""


@dataclass(frozen=True)
class IstftConfig:
    n_fft: int
    hop_length: int
    win_length: int
    window: str = "hann_periodic"
    center: bool = True
    normalized: bool = False
    onesided: bool = True
    length: int | None = None
    sample_rate: int = 32000
    samples_per_token: int = 2048
    upscale_factor: int = 4
    zeroed_bins: tuple[int, ...] = field(default=())
    spectral_layout: str = "B,F,T,2"

    def __post_init__(self) -> None:
        # Tuple, so the frozen config stays hashable (it keys the envelope cache).
        object.__setattr__(self, "zeroed_bins", tuple(self.zeroed_bins))
        for name in ("n_fft", "hop_length", "win_length", "sample_rate", "samples_per_token",
                     "upscale_factor"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise IstftConfigError(f"IstftConfig.{name} must be a positive int, got {v!r}")
        for name in ("center", "normalized", "onesided"):
            if not isinstance(getattr(self, name), bool):
                raise IstftConfigError(f"IstftConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if not self.hop_length <= self.win_length <= self.n_fft:
            raise IstftConfigError(
                f"IstftConfig needs hop_length <= win_length <= n_fft, got {self.hop_length}, "
                f"{self.win_length}, {self.n_fft}")
        if self.window not in WINDOWS:
            raise IstftConfigError(f"IstftConfig.window must be one of {WINDOWS}, got {self.window!r}")
        if self.spectral_layout not in LAYOUTS:
            raise IstftConfigError(
                f"IstftConfig.spectral_layout must be one of {LAYOUTS}, got {self.spectral_layout!r}")
        if self.length is not None and (not isinstance(self.length, int) or isinstance(self.length, bool)
                                        or self.length < 0):
            raise IstftConfigError(f"IstftConfig.length must be None or an int >= 0, got {self.length!r}")
        bad = [b for b in self.zeroed_bins
               if not isinstance(b, int) or isinstance(b, bool) or not 0 <= b < self.n_bins]
        if bad:
            raise IstftConfigError(f"IstftConfig.zeroed_bins {bad} are not bins in [0, {self.n_bins})")
        # Soprano: T tokens -> upscale*(T-1)+1 frames -> hop*upscale*(T-1) samples.
        if self.samples_per_token != self.hop_length * self.upscale_factor:
            raise IstftConfigError(
                f"IstftConfig.samples_per_token ({self.samples_per_token}) must equal hop_length * "
                f"upscale_factor ({self.hop_length} * {self.upscale_factor})")

    @property
    def n_bins(self) -> int:
        return self.n_fft // 2 + 1 if self.onesided else self.n_fft

    def num_samples(self, n_frames: int) -> int:
        """Output length for `n_frames` spectral frames."""
        if self.length is not None:
            return self.length
        full = self.n_fft + self.hop_length * (n_frames - 1)
        return full - 2 * (self.n_fft // 2) if self.center else full

    @classmethod
    def for_n_fft(cls, n_fft: int, hop_length: int, sample_rate: int, samples_per_token: int,
                  upscale_factor: int) -> IstftConfig:
        """Soprano's settings for shapes read from a checkpoint: win = n_fft, DC and Nyquist zeroed."""
        return cls(n_fft=n_fft, hop_length=hop_length, win_length=n_fft, sample_rate=sample_rate,
                   samples_per_token=samples_per_token, upscale_factor=upscale_factor,
                   zeroed_bins=(0, n_fft // 2))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["zeroed_bins"] = list(self.zeroed_bins)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IstftConfig:
        if not isinstance(d, dict):
            raise IstftConfigError(f"IstftConfig.from_dict expects a dict, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        # The exporter's JSON also describes the ONNX file and the decoder beside the ISTFT settings.
        d = {k: v for k, v in d.items() if k not in EXPORT_METADATA_KEYS}
        unknown, missing = sorted(set(d) - names), sorted(names - set(d))
        if unknown or missing:
            raise IstftConfigError(
                f"IstftConfig dict: unknown keys {unknown}, missing keys {missing} "
                f"(expected exactly {sorted(names)})")
        if not isinstance(d["zeroed_bins"], (list, tuple)):
            raise IstftConfigError(f"IstftConfig.zeroed_bins must be a list, got {d['zeroed_bins']!r}")
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | Path) -> IstftConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise IstftConfigError(f"{path}: cannot read ISTFT config JSON: {e}") from e
        try:
            return cls.from_dict(d)
        except IstftConfigError as e:
            raise IstftConfigError(f"{path}: {e}") from e

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


def _layout_error(shape: tuple[int, ...], n_bins: int, why: str) -> ValueError:
    return ValueError(
        f"spectrum of shape {shape} is {why}: accepted are real [B, F, T, 2] or [B, 2, F, T] "
        f"with F = {n_bins}, or complex [B, F, T]")


def _to_btf(spec: np.ndarray, config: IstftConfig) -> np.ndarray:
    """Any accepted layout -> a fresh, C-contiguous complex [B, T, F] (frames contiguous for the
    FFT), with config.zeroed_bins set to zero. Never aliases the input."""
    spec = np.asarray(spec)
    F, shape = config.n_bins, tuple(spec.shape)
    # Single precision unless the input is double: float32 FFTs are twice as fast and exact enough.
    double = spec.dtype in (np.float64, np.complex128, np.clongdouble, np.longdouble)
    ctype = np.complex128 if double else np.complex64
    if np.iscomplexobj(spec):
        if spec.ndim != 3 or shape[1] != F:
            raise _layout_error(shape, F, "not a valid complex spectrum")
        src = spec
    elif spec.ndim != 4:
        raise _layout_error(shape, F, "not 4-D")
    else:
        bftc = shape[1] == F and shape[3] == 2
        bcft = shape[1] == 2 and shape[2] == F
        if bftc == bcft:
            raise _layout_error(shape, F, "ambiguous" if bftc else "in neither layout")
        if bftc:  # (re, im) pairs are already complex numbers in memory: view, don't build
            rtype = np.float64 if double else np.float32
            src = np.ascontiguousarray(spec, dtype=rtype).view(ctype)[..., 0]
        else:
            src = spec[:, 0] + 1j * spec[:, 1]  # rare layout: simple over fast
    B, _, T = src.shape
    if T < 1:
        raise _layout_error(shape, F, "empty along time (T = 0)")
    X = np.empty((B, T, F), dtype=ctype)
    X[...] = src.transpose(0, 2, 1)
    if config.zeroed_bins:
        X[:, :, list(config.zeroed_bins)] = 0
    return X


def spectral_frames_to_complex(spec: np.ndarray, config: IstftConfig) -> np.ndarray:
    """[B, F, T, 2], [B, 2, F, T] (real) or [B, F, T] (complex) -> complex [B, F, T] with the zeroed
    bins at zero: the spectrum the ISTFT inverts. Layout from the shape; a new array (a strided view
    of [B, T, F] memory)."""
    return _to_btf(spec, config).transpose(0, 2, 1)


def _window(config: IstftConfig) -> np.ndarray:
    """The analysis window, zero-padded to n_fft and centred (as torch.istft does), float64."""
    n = np.arange(config.win_length)
    w = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / config.win_length)  # periodic Hann
    left = (config.n_fft - config.win_length) // 2
    return np.pad(w, (left, config.n_fft - config.win_length - left))


def _overlap_add(frames: np.ndarray, hop: int) -> np.ndarray:
    """[..., T, n] -> [..., hop*(T-1)+n]. Splits each frame into hop-sized blocks (padding n up to a
    multiple of hop) and adds the r-th block of every frame at once: a loop over n/hop, not over T."""
    *lead, T, n = frames.shape
    R = -(-n // hop)
    if R * hop != n:
        frames = np.pad(frames, [(0, 0)] * (frames.ndim - 1) + [(0, R * hop - n)])
    blocks = frames.reshape(*lead, T, R, hop)
    out = np.zeros((*lead, T + R - 1, hop), dtype=frames.dtype)
    for r in range(R):
        out[..., r:r + T, :] += blocks[..., r, :]
    return out.reshape(*lead, (T + R - 1) * hop)[..., : hop * (T - 1) + n]


def _trim(config: IstftConfig, n_frames: int) -> tuple[int, int]:
    """torch.istft's [start, end) slice of the overlap-added signal (end may pass its length)."""
    start = config.n_fft // 2 if config.center else 0
    return start, start + config.num_samples(n_frames)


@lru_cache(maxsize=32)
def _inv_envelope(config: IstftConfig, n_frames: int) -> np.ndarray:
    """1 / squared-window envelope over the kept samples (cached: it depends only on config and T)."""
    w = _window(config)
    env = _overlap_add(np.broadcast_to(w * w, (n_frames, config.n_fft)), config.hop_length)
    start, end = _trim(config, n_frames)
    env = env[start:end]
    if env.size and env.min() <= NOLA_EPS:
        i = int(np.argmin(env))
        raise ValueError(
            f"ISTFT NOLA check failed: window envelope {env[i]:.3g} <= {NOLA_EPS} at kept sample {i} "
            f"(n_fft={config.n_fft}, hop={config.hop_length}, center={config.center}, "
            f"length={config.length}, T={n_frames})")
    inv = 1.0 / env
    inv.flags.writeable = False
    return inv


def _istft_numpy(X: np.ndarray, config: IstftConfig) -> np.ndarray:
    T = X.shape[1]
    start, end = _trim(config, T)
    inv = _inv_envelope(config, T)  # runs the NOLA check first, like torch
    if config.onesided:
        frames = np.fft.irfft(X, n=config.n_fft, axis=-1)
    else:
        frames = np.fft.ifft(X, n=config.n_fft, axis=-1).real
    scale = np.sqrt(config.n_fft) if config.normalized else 1.0
    frames *= (_window(config) * scale).astype(frames.dtype)
    y = _overlap_add(frames, config.hop_length)[:, start:end]
    y = (y * inv[: y.shape[1]].astype(y.dtype)).astype(np.float32, copy=False)
    if y.shape[1] < end - start:  # length past the signal: torch pads zeros at the tail
        y = np.pad(y, ((0, 0), (0, end - start - y.shape[1])))
    return y


def _istft_torch(X: np.ndarray, config: IstftConfig) -> np.ndarray:
    try:
        import torch
    except ImportError as e:
        raise MissingBackendError(
            "istft(use_torch=True) needs torch: pip install 'soprano-onnx[export]' (torch==2.13.0), "
            "or call istft(..., use_torch=False) for the NumPy path") from e
    spec = torch.from_numpy(X).transpose(1, 2).contiguous()  # [B, F, T]; strided input is ~10x slower
    window = torch.hann_window(config.win_length, periodic=True, dtype=spec.real.dtype)
    y = torch.istft(spec, config.n_fft, config.hop_length, config.win_length, window,
                    center=config.center, normalized=config.normalized, onesided=config.onesided,
                    length=config.length, return_complex=False)
    return y.numpy().astype(np.float32)


def istft(spec: np.ndarray, config: IstftConfig, use_torch: bool = False) -> np.ndarray:
    """Spectrum ([B, F, T, 2], [B, 2, F, T] or complex [B, F, T]) -> float32 audio [B, N].

    N = config.num_samples(T) (hop*(T-1) with center and no length). The input is not modified.
    """
    X = _to_btf(spec, config)
    if config.num_samples(X.shape[1]) == 0:  # T=1 with center: defined as empty (torch raises)
        return np.zeros((X.shape[0], 0), dtype=np.float32)
    return _istft_torch(X, config) if use_torch else _istft_numpy(X, config)
