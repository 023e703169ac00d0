"""Export the decoder up to its spectral output, and the JSON that drives the ISTFT postprocess."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline_lib.audio.istft import IstftConfig
from pipeline_lib.export.onnx_io import DEFAULT_OPSET, export_to_onnx, ort_session
from pipeline_lib.errors import ExportError
from pipeline_lib.fsutil import write_json
from pipeline_lib.model.decoder import SopranoSpectralDecoder, load_decoder
from pipeline_lib.model.lm import LMConfig
from pipeline_lib.registry import DECODER_CONFIG, DECODER_FILE

log = logging.getLogger(__name__)
DECODER_ONNX = f"{DECODER_FILE}.onnx"
INPUT_NAME = "hidden_states"
OUTPUT_NAME = "spectrum"


@dataclass(frozen=True)
class DecoderExport:
    onnx_path: Path
    config_path: Path
    max_abs_error: float  # ONNX vs torch on the export check input


def istft_config_for(decoder: SopranoSpectralDecoder) -> IstftConfig:
    d = decoder.dims
    return IstftConfig.for_n_fft(
        d.n_fft,
        hop_length=d.hop_length,
        sample_rate=d.sample_rate,
        samples_per_token=d.samples_per_token,
        upscale_factor=d.upscale_factor,
    )


def decoder_config_dict(decoder: SopranoSpectralDecoder) -> dict:
    cfg = istft_config_for(decoder).to_dict()
    cfg["onnx"] = {
        "file": DECODER_ONNX,
        "input": {"name": INPUT_NAME, "shape": ["batch", decoder.dims.input_channels, "tokens"], "dtype": "float32"},
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["batch", decoder.dims.num_bins, "frames", 2],
            "dtype": "float32",
            "frames": f"{decoder.dims.upscale_factor} * (tokens - 1) + 1",
            "last_dim": ["real", "imag"],
        },
    }
    cfg["decoder"] = decoder.dims.to_dict()
    return cfg


def export_decoder(ckpt_dir: Path | str, out_dir: Path | str, opset: int = DEFAULT_OPSET, seed: int = 0) -> DecoderExport:
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lm_cfg = LMConfig.from_checkpoint(ckpt_dir)
    decoder = load_decoder(ckpt_dir / "decoder.pth", expected_input_channels=lm_cfg.hidden_size)
    gen = torch.Generator().manual_seed(seed)
    example = torch.randn(2, decoder.dims.input_channels, 7, generator=gen)
    onnx_path = export_to_onnx(
        decoder,
        (example,),
        out_dir / DECODER_ONNX,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch", 2: "tokens"}, OUTPUT_NAME: {0: "batch", 2: "frames"}},
        opset=opset,
    )
    check = torch.randn(1, decoder.dims.input_channels, 11, generator=gen)
    with torch.no_grad():
        ref = decoder(check).numpy()
    got = ort_session(onnx_path).run(None, {INPUT_NAME: check.numpy()})[0]
    if got.shape != ref.shape:
        raise ExportError(f"{onnx_path}: ONNX output shape {got.shape} differs from torch's {ref.shape}.")
    err = float(np.abs(got - ref).max())
    config_path = out_dir / DECODER_CONFIG
    write_json(config_path, decoder_config_dict(decoder))
    log.info("decoder export check: max abs error %.3g (shape %s)", err, got.shape)
    return DecoderExport(onnx_path, config_path, err)
