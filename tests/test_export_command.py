"""`soprano-onnx export` outside DVC: a local checkpoint directory or a hub id -> a self-contained folder."""

import subprocess
import sys
import time

from pipeline_lib.export.decoder import DECODER_CONFIG, DECODER_ONNX
from pipeline_lib.export.lm import FUSED_ONNX, LM_CONFIG, LM_ONNX


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pipeline_lib.cli", "export", *args], capture_output=True, text=True,
                          timeout=600, env=env)


def test_export_local_checkpoint(tiny_checkpoint, tmp_path):
    out = tmp_path / "onnx"
    proc = _cli("--checkpoint", str(tiny_checkpoint), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    for name in (DECODER_ONNX, DECODER_CONFIG, LM_ONNX, FUSED_ONNX, LM_CONFIG, "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert "max abs error" in proc.stdout and "fused for ONNX Runtime" in proc.stdout


def test_export_decoder_only_and_lm_only(tiny_checkpoint, tmp_path):
    assert _cli("--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "d"), "--decoder-only").returncode == 0
    assert (tmp_path / "d" / DECODER_ONNX).is_file() and not (tmp_path / "d" / LM_ONNX).exists()
    assert _cli("--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "l"), "--lm-only").returncode == 0
    assert (tmp_path / "l" / LM_ONNX).is_file() and not (tmp_path / "l" / DECODER_ONNX).exists()
    assert (tmp_path / "l" / "tokenizer.json").is_file()


def test_export_bad_checkpoint_leaves_nothing(tiny_checkpoint, tmp_path):
    import shutil

    bad = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, bad)
    (bad / "decoder.pth").unlink()
    out = tmp_path / "onnx"
    proc = _cli("--checkpoint", str(bad), "--out", str(out))
    assert proc.returncode == 2
    assert "decoder.pth" in proc.stderr
    assert not out.exists() and not any(p.name.startswith(".onnx") for p in tmp_path.iterdir())


def test_export_hub_id_fails_fast_offline(tmp_path):
    start = time.monotonic()
    proc = _cli("--checkpoint", "ekwek/Soprano-1.1-80M", "--out", str(tmp_path / "o"), "--timeout", "20")
    assert time.monotonic() - start < 60
    assert proc.returncode == 2
    assert "random-80m" in proc.stderr and "tiny" in proc.stderr
    assert not (tmp_path / "o").exists()
