"""`soprano-onnx export`: a checkpoint (local directory or hub id) -> one self-contained ONNX folder.

The command replaces only the files it writes in --out (each atomically, once the whole export has
succeeded); anything else there stays as it was. So `--decoder-only` then `--lm-only` into one folder
gives a complete folder, and `--out .` is safe.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from pipeline_lib.errors import SopranoOnnxError


# The ONNX opsets the export takes: below 13 torch cannot express the models; 23 is torch's highest.
OPSETS = range(13, 24)


def opset(text: str) -> int:
    """argparse type: an opset in OPSETS."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value not in OPSETS:
        raise argparse.ArgumentTypeError(f"expected an ONNX opset {OPSETS[0]}..{OPSETS[-1]}, got {text!r}")
    return value  # type: ignore[return-value]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (upstream layout) or hub id, e.g. ekwek/Soprano-1.1-80M")
    p.add_argument("--revision", default="main", help="hub revision (branch, tag or commit) when --checkpoint is a hub id")
    p.add_argument("--out", required=True, type=Path, help="output folder (ONNX files, JSON configs, tokenizer); other files in it are kept")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--decoder-only", action="store_true", help="export only the decoder")
    only.add_argument("--lm-only", action="store_true", help="export only the LM step model")
    p.add_argument("--opset", type=opset, default=17, help=f"ONNX opset, {OPSETS[0]}..{OPSETS[-1]} (default: 17)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the hub")


def resolve_checkpoint(spec: str, revision: str, workdir: Path, timeout_s: float) -> Path:
    """A local directory as is; anything else is a hub id fetched into ``workdir``."""
    from pipeline_lib.checkpoint import CheckpointConfig, fetch_checkpoint
    from pipeline_lib.checkpoint_checks import validate_checkpoint

    path = Path(spec).expanduser()
    if path.is_dir():
        validate_checkpoint(path)
        return path
    if spec.count("/") != 1 or path.exists() or spec.startswith(("/", ".", "~")):
        raise SopranoOnnxError(f"--checkpoint {spec!r}: not a directory, and not a hub id of the form owner/name.")
    cfg = CheckpointConfig(name=spec.replace("/", "--"), source="hub", repo_id=spec, revision=revision, timeout_s=timeout_s)
    return fetch_checkpoint(cfg, workdir / cfg.name)


def run(args: argparse.Namespace) -> int:
    from pipeline_lib.export.decoder import export_decoder
    from pipeline_lib.export.lm import copy_tokenizer_files, export_lm
    from pipeline_lib.fsutil import atomic_files, check_output_dir

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    check_output_dir(args.out, "--out")  # before a download or an export that would be lost
    with tempfile.TemporaryDirectory(prefix="soprano-export-") as work:
        ckpt = resolve_checkpoint(args.checkpoint, args.revision, Path(work), args.timeout)
        with atomic_files(args.out) as tmp:
            if not args.lm_only:
                r = export_decoder(ckpt, tmp, opset=args.opset)
                print(f"decoder: {args.out / r.onnx_path.name} (check: max abs error {r.max_abs_error:.2e})")
            if not args.decoder_only:
                r = export_lm(ckpt, tmp, opset=args.opset)
                print(f"LM step: {args.out / r.onnx_path.name} (check: logits max abs error {r.max_abs_error:.2e}); "
                      f"fused for ONNX Runtime: {args.out / r.fused_path.name} ({r.fused_max_abs_error:.2e})")
            copy_tokenizer_files(ckpt, tmp)
    print(f"export done in {time.perf_counter() - start:.1f} s -> {args.out}")
    return 0
