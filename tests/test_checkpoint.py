"""pipeline_lib.checkpoint / checkpoint_checks / tokenizer_gen: offline sources, upstream layout, validation errors."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline_lib.checkpoint import SOPRANO_LM_CONFIG, CheckpointConfig, fetch_checkpoint
from pipeline_lib.checkpoint_checks import CHECKPOINT_FILES, validate_checkpoint
from pipeline_lib.errors import CheckpointError
from pipeline_lib.tokenizer_gen import build_tokenizer, write_tokenizer_files

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE = (REPO_ROOT / "../shared/fixtures/soprano-80m").resolve()
needs_fixture = pytest.mark.skipif(not (FIXTURE / "tokenizer.json").is_file(), reason=f"{FIXTURE} absent")
PROMPT = "[STOP][TEXT]hello world.[START]"


def tiny_cfg(**kw) -> CheckpointConfig:
    base = dict(name="tiny", source="random", num_layers=2, seed=0, lm_head_scale=40.0, tokenizer_fixture=None)
    return CheckpointConfig(**{**base, **kw})


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


@pytest.fixture(scope="module")
def generated_pair(module_tmp) -> tuple[Path, Path]:
    """Two tiny checkpoints from the same seed with the generated tokenizer."""
    root = module_tmp.mktemp("det")
    return fetch_checkpoint(tiny_cfg(), root / "a"), fetch_checkpoint(tiny_cfg(), root / "b")


def test_every_conf_file_parses():
    for f in sorted((REPO_ROOT / "conf/checkpoint").glob("*.yaml")):
        cfg = CheckpointConfig.from_mapping(yaml.safe_load(f.read_text()))
        assert cfg.name == f.stem


def test_from_mapping_accepts_dictconfig_and_rejects_unknown_keys():
    from omegaconf import OmegaConf

    m = yaml.safe_load((REPO_ROOT / "conf/checkpoint/tiny.yaml").read_text())
    assert CheckpointConfig.from_mapping(OmegaConf.create(m)).num_layers == 2
    with pytest.raises(CheckpointError, match="layerz"):
        CheckpointConfig.from_mapping({**m, "layerz": 3})
    local = CheckpointConfig.from_mapping(OmegaConf.load(REPO_ROOT / "conf/checkpoint/local.yaml"))
    assert local.path is None  # "???" = not given


def test_tiny_fetch_writes_upstream_layout(tiny_checkpoint):
    names = {p.name for p in tiny_checkpoint.iterdir()}
    assert names == set(CHECKPOINT_FILES) | {"source.json"}
    src = json.loads((tiny_checkpoint / "source.json").read_text())
    assert src["name"] == "tiny" and src["source"] == "random" and src["random_weights"] is True
    assert src["num_layers"] == 2 and src["seed"] == 0
    assert src["tokenizer"] in ("fixture", "generated")
    assert json.loads((tiny_checkpoint / "generation_config.json").read_text()) == {"bos_token_id": 3, "eos_token_id": 3}
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    assert cfg == {**SOPRANO_LM_CONFIG, "num_hidden_layers": 2, "max_window_layers": 2, "dtype": "float32"}


def test_validate_reads_shapes(tiny_checkpoint):
    info = validate_checkpoint(tiny_checkpoint)
    assert (info.hidden_size, info.num_layers, info.num_heads, info.num_kv_heads, info.head_dim) == (512, 2, 4, 1, 128)
    assert (info.vocab_size, info.max_position_embeddings, info.intermediate_size) == (8192, 512, 2304)
    assert info.rope_theta == 10000.0 and info.rms_norm_eps == 1e-6
    assert (info.decoder_input_channels, info.decoder_dim, info.decoder_intermediate_dim) == (512, 768, 2304)
    assert (info.decoder_num_layers, info.n_fft, info.dw_kernel) == (8, 2048, 3)
    assert (info.unk_id, info.text_id, info.start_id, info.stop_id, info.audio_token_offset) == (0, 1, 2, 3, 4)
    assert info.num_audio_tokens == 8000
    json.dumps(info.to_dict())


def test_rope_theta_read_from_rope_parameters(tiny_checkpoint, tmp_path):
    ck = shutil.copytree(tiny_checkpoint, tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    del cfg["rope_theta"]
    cfg["rope_parameters"] = {"rope_theta": 5000.0, "rope_type": "default"}
    (ck / "config.json").write_text(json.dumps(cfg))
    assert validate_checkpoint(ck).rope_theta == 5000.0


def test_same_seed_gives_identical_files(generated_pair, tmp_path):
    a, b = generated_pair
    for name in CHECKPOINT_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    other = fetch_checkpoint(tiny_cfg(seed=1), tmp_path / "c")
    assert torch.equal(torch.rand(3), expected), "fetch must not disturb the caller's RNG"
    assert not torch.equal(load_file(a / "model.safetensors")["lm_head.weight"],
                           load_file(other / "model.safetensors")["lm_head.weight"])
    assert not torch.equal(torch.load(a / "decoder.pth")["head.out.weight"], torch.load(other / "decoder.pth")["head.out.weight"])


def test_upstream_decoder_loads_strictly(tiny_checkpoint):
    from soprano.vocos.decoder import SopranoDecoder

    sd = torch.load(tiny_checkpoint / "decoder.pth")
    SopranoDecoder().load_state_dict(sd, strict=True)
    assert torch.equal(sd["head.istft.window"], torch.hann_window(2048))
    assert torch.allclose(sd["decoder.convnext.3.gamma"], torch.full((768,), 8 ** -0.5))
    assert abs(sd["head.out.weight"].std().item() - 0.02) < 0.002
    assert all(v.dtype == torch.float32 for v in sd.values())


def test_transformers_loads_lm(tiny_checkpoint):
    from transformers import Qwen3ForCausalLM

    model = Qwen3ForCausalLM.from_pretrained(tiny_checkpoint)
    assert model.config.num_hidden_layers == 2 and model.dtype == torch.float32
    # lm_head is sharpened (x40 of the 0.0417 init) so greedy decoding is not a near-tie.
    assert model.lm_head.weight.std().item() > 1.0
    with torch.no_grad():
        logits = model(torch.tensor([[3, 1, 8050, 2]])).logits
    assert logits.shape == (1, 4, 8192) and torch.isfinite(logits).all()


def test_generated_tokenizer_structure(generated_pair):
    from transformers import AutoTokenizer

    ck = generated_pair[0]
    assert json.loads((ck / "source.json").read_text())["tokenizer"] == "generated"
    tok = build_tokenizer()
    assert tok.get_vocab_size() == 8192
    assert [tok.token_to_id(t) for t in ("[UNK]", "[TEXT]", "[START]", "[STOP]")] == [0, 1, 2, 3]
    assert tok.token_to_id("[0]") == 4 and tok.token_to_id("[7999]") == 8003
    assert tok.token_to_id(" ") == 8004 and tok.token_to_id("z") == 8056
    hf = AutoTokenizer.from_pretrained(ck)
    ids = hf(PROMPT)["input_ids"]
    assert ids[:2] == [3, 1] and ids[-1] == 2 and all(i >= 8004 for i in ids[2:-1])
    assert hf.pad_token_id == 3 and hf.padding_side == "left"
    # No decoder in the real tokenizer either: join the pieces instead of hf.decode.
    assert "".join(hf.convert_ids_to_tokens(ids[2:-1])) == "hello world."


def test_generated_tokenizer_files_are_deterministic(tmp_path):
    write_tokenizer_files(tmp_path / "x")
    write_tokenizer_files(tmp_path / "y")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "x" / name).read_bytes() == (tmp_path / "y" / name).read_bytes()


@needs_fixture
def test_builtin_config_equals_fixture():
    assert json.loads((FIXTURE / "config.json").read_text()) == SOPRANO_LM_CONFIG


@needs_fixture
def test_generated_tokenizer_matches_fixture_structure():
    real = json.loads((FIXTURE / "tokenizer.json").read_text())
    ours = json.loads(build_tokenizer().to_str())
    for key in ("normalizer", "pre_tokenizer", "added_tokens", "post_processor", "decoder"):
        assert ours[key] == real[key], key
    real_vocab = sorted(real["model"]["vocab"], key=real["model"]["vocab"].get)
    ours_vocab = sorted(ours["model"]["vocab"], key=ours["model"]["vocab"].get)
    assert len(ours_vocab) == len(real_vocab) == 8192
    assert ours_vocab[:8057] == real_vocab[:8057]  # specials, audio tokens, the single characters


@needs_fixture
def test_fixture_tokenizer_used_when_present(tmp_path):
    from transformers import AutoTokenizer

    ck = fetch_checkpoint(tiny_cfg(tokenizer_fixture=str(FIXTURE)), tmp_path / "ck")
    assert json.loads((ck / "source.json").read_text())["tokenizer"] == "fixture"
    assert (ck / "tokenizer.json").read_bytes() == (FIXTURE / "tokenizer.json").read_bytes()
    ids = AutoTokenizer.from_pretrained(ck)(PROMPT)["input_ids"]
    assert ids[:2] == [3, 1] and ids[-1] == 2


def test_missing_fixture_falls_back_to_generated(tmp_path):
    ck = fetch_checkpoint(tiny_cfg(tokenizer_fixture="no/such/dir"), tmp_path / "ck")
    assert json.loads((ck / "source.json").read_text())["tokenizer"] == "generated"


def test_local_copy_keeps_random_marker(tiny_checkpoint, tmp_path):
    out = fetch_checkpoint(CheckpointConfig(name="local", source="local", path=str(tiny_checkpoint)), tmp_path / "ck")
    src = json.loads((out / "source.json").read_text())
    assert src["source"] == "local" and src["random_weights"] is True and src["tokenizer"] == "checkpoint"
    assert (out / "model.safetensors").read_bytes() == (tiny_checkpoint / "model.safetensors").read_bytes()


def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _swap_tokens(a: str, b: str):
    def fn(tok: dict) -> None:
        v = tok["model"]["vocab"]
        v[a], v[b] = v[b], v[a]
        for t in tok["added_tokens"]:
            t["id"] = v[t["content"]]
        tok["added_tokens"].sort(key=lambda t: t["id"])

    return fn


def _rename_token(old: str, new: str):
    def fn(tok: dict) -> None:
        tok["model"]["vocab"][new] = tok["model"]["vocab"].pop(old)
        for t in tok["added_tokens"]:
            if t["content"] == old:
                t["content"] = new

    return fn


def _bad_decoder_shape(ck: Path) -> None:
    sd = torch.load(ck / "decoder.pth")
    sd["decoder.convnext.5.pwconv1.weight"] = torch.zeros(2000, 768)
    torch.save(sd, ck / "decoder.pth")


def _bad_decoder_key(ck: Path) -> None:
    sd = torch.load(ck / "decoder.pth")
    del sd["head.istft.window"]
    torch.save(sd, ck / "decoder.pth")


BAD_CASES = {
    "missing_decoder": (lambda ck: (ck / "decoder.pth").unlink(), ["decoder.pth", "config.json", "checkpoint=tiny"]),
    "missing_tokenizer": (lambda ck: (ck / "tokenizer.json").unlink(), ["tokenizer.json", "model.safetensors"]),
    "missing_weights": (lambda ck: (ck / "model.safetensors").unlink(), ["model.safetensors"]),
    "other_architecture": (
        lambda ck: _edit_json(ck / "config.json", lambda c: c.update(architectures=["LlamaForCausalLM"], model_type="llama")),
        ["config.json", "Qwen3ForCausalLM", "LlamaForCausalLM", "llama"],
    ),
    "decoder_shape": (_bad_decoder_shape, ["decoder.pth", "decoder.convnext.5.pwconv1.weight", "[2304, 768]", "[2000, 768]"]),
    "decoder_key": (_bad_decoder_key, ["decoder.pth", "head.istft.window", "[2048]"]),
    "decoder_vs_lm_width": (
        lambda ck: _edit_json(ck / "config.json", lambda c: c.update(hidden_size=640)),
        ["decoder.pth", "512", "640", "hidden_size"],
    ),
    "lm_layers": (
        lambda ck: _edit_json(ck / "config.json", lambda c: c.update(num_hidden_layers=3)),
        ["model.safetensors", "num_hidden_layers=3"],
    ),
    "special_ids": (lambda ck: _edit_json(ck / "tokenizer.json", _swap_tokens("[TEXT]", "[START]")), ["tokenizer.json", "[TEXT]"]),
    "audio_ids": (lambda ck: _edit_json(ck / "tokenizer.json", _rename_token("[7999]", "[audio7999]")), ["tokenizer.json", "[7999]", "8003"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_checkpoint_is_one_clear_error_and_leaves_nothing(case, tiny_checkpoint, tmp_path):
    breaker, needles = BAD_CASES[case]
    bad = shutil.copytree(tiny_checkpoint, tmp_path / "src" / "bad")
    breaker(bad)
    with pytest.raises(CheckpointError) as err:
        validate_checkpoint(bad)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))

    out_parent = tmp_path / "out"
    out_parent.mkdir()
    with pytest.raises(CheckpointError, match="bad"):
        fetch_checkpoint(CheckpointConfig(name="local", source="local", path=str(bad)), out_parent / "ck")
    assert leftovers(out_parent) == []


def test_failure_during_generation_leaves_nothing_and_keeps_old_output(tmp_path, monkeypatch):
    import pipeline_lib.tokenizer_gen as tg

    def broken_tokenizer(out_dir, tokenizer=None):
        paths = write_tokenizer_files(out_dir)
        _edit_json(Path(out_dir) / "tokenizer.json", _swap_tokens("[UNK]", "[STOP]"))
        return paths

    monkeypatch.setattr(tg, "write_tokenizer_files", broken_tokenizer)
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        fetch_checkpoint(tiny_cfg(), tmp_path / "ck")
    assert leftovers(tmp_path) == []

    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "old.txt").write_text("previous good output")
    with pytest.raises(CheckpointError):
        fetch_checkpoint(tiny_cfg(), tmp_path / "ck")
    assert leftovers(tmp_path) == ["ck"] and leftovers(tmp_path / "ck") == ["old.txt"]


def test_local_source_needs_an_existing_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        fetch_checkpoint(CheckpointConfig(name="local", source="local", path=str(tmp_path / "nope")), tmp_path / "ck")
    with pytest.raises(CheckpointError, match="checkpoint.path"):
        fetch_checkpoint(CheckpointConfig(name="local", source="local"), tmp_path / "ck")
    assert leftovers(tmp_path) == []


def _hub_cfg(**kw) -> CheckpointConfig:
    m = yaml.safe_load((REPO_ROOT / "conf/checkpoint/soprano-1.1-80m.yaml").read_text())
    return CheckpointConfig.from_mapping({**m, **kw})


def test_hub_fails_fast_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # Hermetic even where the hub is reachable: nothing listens on the discard port.
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    cfg = _hub_cfg()
    start = time.monotonic()
    with pytest.raises(CheckpointError) as err:
        fetch_checkpoint(cfg, tmp_path / "ck")
    elapsed = time.monotonic() - start
    assert elapsed < cfg.timeout_s <= 30
    msg = str(err.value)
    assert "hub could not be reached" in msg
    for choice in ("checkpoint=random-80m", "checkpoint=tiny", "checkpoint=local checkpoint.path=DIR"):
        assert choice in msg
    assert leftovers(tmp_path) == []


def test_hub_offline_env_fails_immediately(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE.*checkpoint=random-80m"):
        fetch_checkpoint(_hub_cfg(), tmp_path / "ck")
    assert time.monotonic() - start < 1.0
    assert leftovers(tmp_path) == []


def test_hub_hang_is_cut_at_timeout(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda *a, **k: time.sleep(10))
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="within 1 s.*checkpoint=tiny"):
        fetch_checkpoint(_hub_cfg(timeout_s=1), tmp_path / "ck")
    assert time.monotonic() - start < 3.0
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_random_80m_real_shapes(tmp_path):
    m = yaml.safe_load((REPO_ROOT / "conf/checkpoint/random-80m.yaml").read_text())
    ck = fetch_checkpoint(CheckpointConfig.from_mapping(m), tmp_path / "ck")
    info = validate_checkpoint(ck)
    assert info.num_layers == 17
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg == {**SOPRANO_LM_CONFIG, "dtype": "float32"}
    n = sum(t.numel() for t in load_file(ck / "model.safetensors").values())
    assert 70e6 < n < 90e6
