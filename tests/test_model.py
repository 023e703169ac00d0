"""The torch reference against transformers' Qwen3 and the upstream decoder (the oracles)."""

import pytest
import torch

from pipeline_lib.errors import CheckpointError
from pipeline_lib.model.decoder import decode_audio, load_decoder
from pipeline_lib.model.lm import extend_cache, load_lm


def _left_padded(batch, seq, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    for b in range(1, batch):
        mask[b, : 2 * b] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def test_lm_matches_transformers_qwen3(tiny_checkpoint):
    from transformers import Qwen3ForCausalLM

    hf = Qwen3ForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    ours = load_lm(tiny_checkpoint)
    ids, mask, pos = _left_padded(3, 17, ours.cfg.vocab_size)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
        got = ours(ids, mask, pos, *ours.empty_cache(3))
    keep = mask.bool()
    assert (ref.logits - got[0])[keep].abs().max().item() <= 1e-3
    assert (ref.hidden_states[-1] - got[1])[keep].abs().max().item() <= 1e-4


def test_lm_kv_cache_steps_match_full_forward(tiny_checkpoint):
    lm = load_lm(tiny_checkpoint)
    ids, mask, pos = _left_padded(2, 20, lm.cfg.vocab_size, seed=1)
    with torch.no_grad():
        full = lm(ids, mask, pos, *lm.empty_cache(2))
        out = lm(ids[:, :12], mask[:, :12], pos[:, :12], *lm.empty_cache(2))
        past, steps = out[2:], []
        for t in range(12, 20):
            out = lm(ids[:, t : t + 1], mask[:, : t + 1], pos[:, t : t + 1], *past)
            assert out[2].shape == (2, lm.cfg.num_kv_heads, 1, lm.cfg.head_dim)  # this step's key only
            past = extend_cache(past, out[2:])
            steps.append(out[0])
    assert past[0].shape == (2, lm.cfg.num_kv_heads, 20, lm.cfg.head_dim)
    assert (torch.cat(steps, 1) - full[0][:, 12:]).abs().max().item() <= 1e-3


def test_decoder_audio_matches_upstream(tiny_checkpoint):
    from soprano.vocos.decoder import SopranoDecoder

    upstream = SopranoDecoder()
    upstream.load_state_dict(torch.load(tiny_checkpoint / "decoder.pth"))
    upstream.eval()
    ours = load_decoder(tiny_checkpoint / "decoder.pth", expected_input_channels=512)
    hidden = torch.randn(2, 512, 9, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = upstream(hidden.clone())
    got = decode_audio(ours, hidden)
    assert got.shape == ref.shape == (2, 8 * ours.dims.samples_per_token)
    assert (got - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    assert ref.std().item() > 0  # not silence


def test_decoder_of_other_shapes_is_a_clear_error(tiny_checkpoint, tmp_path):
    sd = torch.load(tiny_checkpoint / "decoder.pth")
    sd["decoder.convnext.3.pwconv1.weight"] = torch.zeros(100, 768)
    bad = tmp_path / "decoder.pth"
    torch.save(sd, bad)
    with pytest.raises(CheckpointError, match=r"decoder\.pth.*convnext\.3\.pwconv1\.weight.*\(100, 768\)"):
        load_decoder(bad)


def test_decoder_input_channels_must_match_lm(tiny_checkpoint):
    with pytest.raises(CheckpointError, match="hidden size 640"):
        load_decoder(tiny_checkpoint / "decoder.pth", expected_input_channels=640)


def test_stateful_form_equals_the_step_model(tiny_checkpoint):
    """SopranoLMStateful (stacked projections, SDPA, present = past + new, rows picked by beam_idx) gives
    the step model's logits and hidden states; after dropping a row through beam_idx as well."""
    from pipeline_lib.model.lm import SopranoLMStateful

    lm = load_lm(tiny_checkpoint).eval()
    sf = SopranoLMStateful(lm).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 8000, (3, 6), generator=g)
    mask = torch.ones(3, 6, dtype=torch.int64)
    mask[1, :2] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = lm(ids, mask, pos, *lm.empty_cache(3))
        got = sf(ids, mask, pos, torch.arange(3, dtype=torch.int32), *lm.empty_cache(3))
        assert (got[0] - ref[0]).abs().max() < 1e-3 and (got[1] - ref[1]).abs().max() < 1e-4
        for a, b in zip(got[2:], extend_cache(lm.empty_cache(3), ref[2:])):
            assert a.shape == b.shape and (a - b).abs().max() < 1e-5
        keep = torch.tensor([0, 2])  # row 1 leaves the batch
        nxt = ref[0][keep, -1].argmax(-1)[:, None]
        m2 = torch.cat([mask[keep], torch.ones(2, 1, dtype=torch.int64)], 1)
        p2 = m2.sum(-1, keepdim=True) - 1
        ref2 = lm(nxt, m2, p2, *[c[keep] for c in extend_cache(lm.empty_cache(3), ref[2:])])
        got2 = sf(nxt, m2, p2, keep.to(torch.int32), *got[2:])
    assert (got2[0] - ref2[0]).abs().max() < 1e-3 and (got2[1] - ref2[1]).abs().max() < 1e-4
    assert got2[2].shape == (2, lm.cfg.num_kv_heads, 7, lm.cfg.head_dim)
