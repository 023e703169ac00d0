"""The exported ONNX models against the upstream oracles directly: upstream's SopranoDecoder on the same
decoder.pth, and transformers' Qwen3ForCausalLM on the same weights (issue: export parity)."""

import shutil

import numpy as np
import pytest
import torch

from pipeline_lib.audio.istft import IstftConfig, istft
from pipeline_lib.export.decoder import DECODER_CONFIG, DECODER_ONNX
from pipeline_lib.export.lm import LM_ONNX
from pipeline_lib.export.onnx_io import ort_session
from pipeline_lib.parity import audio_metrics


def _decoder_vs_upstream(ckpt, export_dir):
    from soprano.vocos.decoder import SopranoDecoder

    upstream = SopranoDecoder()
    upstream.load_state_dict(torch.load(ckpt / "decoder.pth"))
    upstream.eval()
    hidden = torch.randn(2, 512, 40, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = upstream(hidden.clone()).numpy()
    spec = ort_session(export_dir / DECODER_ONNX).run(None, {"hidden_states": hidden.numpy()})[0]
    audio = istft(spec, IstftConfig.from_json(export_dir / DECODER_CONFIG))
    snr, rel = audio_metrics(ref, audio)
    assert snr >= 60.0, snr
    assert rel <= 1e-3, rel


def _lm_vs_transformers(ckpt, export_dir, steps):
    from transformers import Qwen3ForCausalLM

    hf = Qwen3ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    sess = ort_session(export_dir / LM_ONNX, 2)
    n_layers = hf.config.num_hidden_layers
    names = [o.name for o in sess.get_outputs()]
    prompt = torch.randint(8004, 8192, (1, 20), generator=torch.Generator().manual_seed(0))
    prompt[0, 0], prompt[0, 1], prompt[0, -1] = 3, 1, 2  # [STOP][TEXT] ... [START]
    feed = {"input_ids": prompt.numpy(), "attention_mask": np.ones((1, 20), np.int64),
            "position_ids": np.arange(20)[None].astype(np.int64)}
    feed.update({f"past_{k}_{i}": np.zeros((1, 1, 0, 128), np.float32) for i in range(n_layers) for k in ("key", "value")})
    out = dict(zip(names, sess.run(names, feed)))
    with torch.no_grad():
        ref = hf(input_ids=prompt, output_hidden_states=True)
    assert np.abs(out["logits"] - ref.logits.numpy()).max() <= 1e-3
    assert np.abs(out["hidden_states"] - ref.hidden_states[-1].numpy()).max() <= 1e-3
    # Greedy: ONNX with its KV cache against transformers' greedy generate (no sampling, no penalty).
    ids, tokens = prompt.numpy(), []
    for t in range(steps):
        nxt = out["logits"][:, -1].argmax(-1)[:, None].astype(np.int64)
        tokens.append(int(nxt[0, 0]))
        total = ids.shape[1] + t + 1
        step = {"input_ids": nxt, "attention_mask": np.ones((1, total), np.int64),
                "position_ids": np.array([[total - 1]], np.int64)}
        for i in range(n_layers):
            for k in ("key", "value"):
                step[f"past_{k}_{i}"] = feed[f"past_{k}_{i}"] = np.concatenate([feed[f"past_{k}_{i}"], out[f"new_{k}_{i}"]], 2)
        out = dict(zip(names, sess.run(names, step)))
    with torch.no_grad():
        gen = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps, min_new_tokens=steps,
                          do_sample=False, pad_token_id=3)
    assert tokens == gen[0, 20:].tolist()


def test_tiny_decoder_matches_upstream(tiny_checkpoint, tiny_export):
    _decoder_vs_upstream(tiny_checkpoint, tiny_export)


def test_tiny_lm_matches_transformers(tiny_checkpoint, tiny_export):
    _lm_vs_transformers(tiny_checkpoint, tiny_export, steps=64)


@pytest.fixture(scope="module")
def random_80m(module_tmp):
    import yaml

    from conftest import REPO_ROOT
    from pipeline_lib.checkpoint import CheckpointConfig, fetch_checkpoint
    from pipeline_lib.export.decoder import export_decoder
    from pipeline_lib.export.lm import export_lm

    cfg = CheckpointConfig.from_mapping(yaml.safe_load((REPO_ROOT / "conf/checkpoint/random-80m.yaml").read_text()))
    root = module_tmp.mktemp("r80m")
    ckpt = fetch_checkpoint(cfg, root / "ckpt")
    export_decoder(ckpt, root / "onnx")
    export_lm(ckpt, root / "onnx")
    shutil.copy2(ckpt / "tokenizer.json", root / "onnx" / "tokenizer.json")  # as `soprano-onnx export` does
    return ckpt, root / "onnx"


@pytest.mark.slow
def test_random_80m_decoder_matches_upstream(random_80m):
    _decoder_vs_upstream(*random_80m)


@pytest.mark.slow
def test_random_80m_lm_matches_transformers(random_80m):
    _lm_vs_transformers(*random_80m, steps=64)


@pytest.mark.slow
def test_random_80m_openvino_fp32_audio_equals_onnx_runtime(random_80m, tmp_path):
    """End to end through SopranoTTS, greedy: OpenVINO fp32 IR vs the ONNX Runtime fp32 export, held to
    the export's audio thresholds (conf/parity/default.yaml)."""
    pytest.importorskip("openvino")
    import yaml

    from conftest import REPO_ROOT
    from pipeline_lib import SopranoTTS
    from pipeline_lib.convert import convert_target

    ckpt, export = random_80m
    ov_dir = tmp_path / "ov"
    convert_target("openvino", "fp32", export, export, ov_dir, None, ckpt)
    th = yaml.safe_load((REPO_ROOT / "conf/parity/default.yaml").read_text())
    text = "The quick brown fox jumps over the lazy dog. Then it runs back across the quiet green field!"
    ref = SopranoTTS.from_dir(export, num_threads=2).synthesize(text, max_new_tokens=64)
    stateful = SopranoTTS.from_dir(ov_dir, backend="openvino_cpu", num_threads=2)  # the runtime's choice
    assert stateful.lm_path.name == "soprano_lm_stateful.xml" and stateful.lm.stateful
    plain = SopranoTTS(ov_dir / "lm" / "soprano_lm_step.xml", ov_dir / "decoder" / "soprano_decoder_preistft.xml",
                       backend="openvino_cpu", num_threads=2)
    b = ref["audio"]
    assert len(b) == 2 * 63 * 2048 and np.abs(b).max() > 0  # two sentences, 64 tokens each (no [STOP]: random weights)
    for name, tts in (("stateful", stateful), ("plain", plain)):
        got = tts.synthesize(text, max_new_tokens=64)
        a = got["audio"]
        assert got["sample_rate"] == ref["sample_rate"] == 32000
        assert a.shape == b.shape
        snr, rel = audio_metrics(b, a)
        print(f"OpenVINO fp32 ({name} LM) vs ONNX Runtime fp32, SopranoTTS on random-80m: SNR {snr:.1f} dB, "
              f"max abs / peak {rel:.2e}")
        assert snr >= th["audio_snr_db_min"] and rel <= th["audio_rel_max_abs"], (name, snr, rel)
