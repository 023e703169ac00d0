"""Torch reference of the Soprano (Vocos-style) decoder, up to its spectral output.

Loads ``decoder.pth`` with the upstream key names. The ISTFT is not part of this module:
``decode_audio`` applies it with torch.istft so the reference can produce audio.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline_lib.errors import CheckpointError
from pipeline_lib.model.weights import load_checked

# Buffers that upstream keeps in its state_dict but that are not weights of the spectral model.
_NON_WEIGHT_KEYS = ("head.istft.window",)
LAYER_NORM_EPS = 1e-6
MAX_MAGNITUDE = 100.0
# Not stored in decoder.pth: upstream's fixed settings (ISTFTHead hop = n_fft / 4, interpolation x4, 32 kHz).
HOP_FRACTION = 4
UPSCALE_FACTOR = 4
SAMPLE_RATE = 32000


@dataclass(frozen=True)
class DecoderDims:
    """Shapes of a decoder, read from its state_dict."""

    input_channels: int
    dim: int
    intermediate_dim: int
    num_layers: int
    dw_kernel: int
    n_fft: int
    hop_length: int
    upscale_factor: int = UPSCALE_FACTOR
    sample_rate: int = SAMPLE_RATE

    @property
    def num_bins(self) -> int:
        return self.n_fft // 2 + 1

    @property
    def samples_per_token(self) -> int:
        return self.hop_length * self.upscale_factor

    def to_dict(self) -> dict:
        return asdict(self)


def dims_from_state_dict(sd: dict[str, torch.Tensor], path: Path | str = "decoder.pth") -> DecoderDims:
    """Read the decoder's shapes from its weights; a missing key is a CheckpointError naming the file."""

    def get(key: str) -> torch.Tensor:
        if key not in sd:
            raise CheckpointError(
                f"{path}: key '{key}' is missing; this is not a Soprano decoder state_dict "
                "(expected keys decoder.embed.*, decoder.convnext.N.*, head.out.*)."
            )
        return sd[key]

    embed = get("decoder.embed.weight")
    num_layers = 0
    while f"decoder.convnext.{num_layers}.dwconv.weight" in sd:
        num_layers += 1
    if num_layers == 0:
        raise CheckpointError(f"{path}: no 'decoder.convnext.0.*' keys; this is not a Soprano decoder state_dict.")
    head = get("head.out.weight")
    return DecoderDims(
        input_channels=int(embed.shape[1]),
        dim=int(embed.shape[0]),
        intermediate_dim=int(get("decoder.convnext.0.pwconv1.weight").shape[0]),
        num_layers=num_layers,
        dw_kernel=int(get("decoder.convnext.0.dwconv.weight").shape[-1]),
        n_fft=int(head.shape[0]) - 2,
        hop_length=(int(head.shape[0]) - 2) // HOP_FRACTION,
    )


class ConvNeXtLayer(nn.Module):
    def __init__(self, dim: int, intermediate_dim: int, dw_kernel: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size=dw_kernel, padding=dw_kernel // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.pwconv2 = nn.Linear(intermediate_dim, dim)
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).transpose(1, 2)
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).transpose(1, 2)


class DecoderBackbone(nn.Module):
    def __init__(self, dims: DecoderDims) -> None:
        super().__init__()
        self.embed = nn.Conv1d(dims.input_channels, dims.dim, kernel_size=1)
        self.norm = nn.LayerNorm(dims.dim, eps=LAYER_NORM_EPS)
        self.convnext = nn.ModuleList(
            ConvNeXtLayer(dims.dim, dims.intermediate_dim, dims.dw_kernel) for _ in range(dims.num_layers)
        )
        self.final_layer_norm = nn.LayerNorm(dims.dim, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.embed(x).transpose(1, 2)).transpose(1, 2)
        for layer in self.convnext:
            x = layer(x)
        return self.final_layer_norm(x.transpose(1, 2))  # [B, T, dim]


class SpectralHead(nn.Module):
    def __init__(self, dim: int, n_fft: int) -> None:
        super().__init__()
        self.out = nn.Linear(dim, n_fft + 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, dim] -> spectral frames [B, F, T, 2] (real, imag)."""
        log_mag, phase = self.out(x).chunk(2, dim=-1)
        mag = torch.clamp(torch.exp(log_mag), max=MAX_MAGNITUDE)
        spec = torch.stack((mag * torch.cos(phase), mag * torch.sin(phase)), dim=-1)  # [B, T, F, 2]
        return spec.transpose(1, 2)


class SopranoSpectralDecoder(nn.Module):
    """Hidden states [B, C, T] -> spectral frames [B, F, upscale*(T-1)+1, 2]."""

    def __init__(self, dims: DecoderDims) -> None:
        super().__init__()
        self.dims = dims
        self.decoder = DecoderBackbone(dims)
        self.head = SpectralHead(dims.dim, dims.n_fft)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        frames = self.dims.upscale_factor * (hidden_states.shape[2] - 1) + 1
        x = F.interpolate(hidden_states, size=frames, mode="linear", align_corners=True)
        return self.head(self.decoder(x))


def load_decoder(path: Path | str, expected_input_channels: int | None = None) -> SopranoSpectralDecoder:
    """Load ``decoder.pth`` (upstream key names) into the reference decoder, checking every shape."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: decoder weights not found; a Soprano checkpoint has decoder.pth beside config.json.")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(f"{path}: cannot be read as a torch state_dict ({exc}); re-fetch the checkpoint.") from exc
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a state_dict (dict of tensors), found {type(sd).__name__}.")
    dims = dims_from_state_dict(sd, path)
    if expected_input_channels is not None and dims.input_channels != expected_input_channels:
        raise CheckpointError(
            f"{path}: decoder input channels {dims.input_channels} do not match the LM hidden size "
            f"{expected_input_channels} from config.json; the two files come from different models."
        )
    model = SopranoSpectralDecoder(dims)
    weights = {k: v for k, v in sd.items() if k not in _NON_WEIGHT_KEYS}
    extra = sorted(set(weights) - set(model.state_dict()))
    if extra:
        raise CheckpointError(f"{path}: unexpected keys {extra[:5]}; this is not a Soprano decoder state_dict.")
    return load_checked(model, weights, path, "this decoder.pth does not match the Soprano decoder shapes")


def spectrum_to_audio(spec: torch.Tensor, n_fft: int, hop_length: int) -> torch.Tensor:
    """The reference postprocess: zero DC and Nyquist bins, then torch.istft (center=True)."""
    complex_spec = torch.complex(spec[..., 0], spec[..., 1]).clone()
    complex_spec[:, 0] = 0
    complex_spec[:, -1] = 0
    window = torch.hann_window(n_fft, periodic=True, dtype=spec.dtype)
    return torch.istft(complex_spec, n_fft, hop_length, n_fft, window, center=True)


@torch.no_grad()
def decode_audio(decoder: SopranoSpectralDecoder, hidden_states: torch.Tensor) -> torch.Tensor:
    """Hidden states [B, C, T] -> audio [B, samples_per_token*(T-1)] with the torch reference."""
    return spectrum_to_audio(decoder(hidden_states), decoder.dims.n_fft, decoder.dims.hop_length)
