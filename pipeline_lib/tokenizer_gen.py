"""Generate a tokenizer with the structure of Soprano's (the real one is not redistributed here).

Layout of the ids, as in the released model: 0..3 = ``[UNK] [TEXT] [START] [STOP]``, 4..8003 = audio
tokens ``[0]``..``[7999]`` (all added special tokens), then 53 single characters, then BPE merges
learnt greedily from a built-in list of common English words until the vocabulary holds 8192 ids.
Everything is deterministic: the same code writes byte-identical files.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers

from pipeline_lib.registry import TOKENIZER_FILE, TOKENIZER_FILES

SPECIAL_TOKENS: tuple[str, ...] = ("[UNK]", "[TEXT]", "[START]", "[STOP]")
NUM_AUDIO_TOKENS = 8000
AUDIO_TOKEN_OFFSET = len(SPECIAL_TOKENS)
VOCAB_SIZE = 8192
ALPHABET = " !\"$%&'*+,-./0123456789<>?_abcdefghijklmnopqrstuvwxyz"
PAD_TOKEN = "[STOP]"

# Ordered by rough frequency in speech; the rank sets the weight, so the earliest words merge first.
_WORDS = """
the you i to and a it that of is in what we me this he for my on have do be not are your
with was know but all just so they like can get there here no about if she one at up go out
now come right him how well want think them her see did good oh yeah as gonna from back let
will who where why take time tell then say make look some thing going over got way when said
would could should people very really more than only into because been had were has also day
little much down after before again never always something nothing everything anything other
another every same work life world man woman child children house home place school water
night morning today tomorrow year years first last long great small large old new young high
under between through around while still even most many each which their these those our us
find give call keep need feel try leave put mean seem turn start show hear play run move live
believe bring happen write stand lose pay meet include continue learn change lead understand
watch follow stop create speak read spend grow open walk win offer remember love consider
appear buy wait serve die send expect build stay fall cut reach kill remain suggest raise pass
sell require report decide pull hand part point fact question number group problem story idea
family friend father mother brother sister money word name city country voice music sound light
hello world thank thanks please sorry yes okay maybe sure nice morning evening weather minute
hour week month second third four five six seven eight nine ten hundred thousand million
""".split()


def _learn_merges(num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE on the built-in word list; ties go to the lexicographically smallest pair."""
    words: dict[tuple[str, ...], int] = {}
    for rank, w in enumerate(_WORDS):
        words[tuple(w)] = words.get(tuple(w), 0) + 1000 // (rank + 10) + 1
    vocab = set(ALPHABET)
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for sym, n in words.items():
            for pair in zip(sym, sym[1:]):
                pairs[pair] += n
        candidates = [p for p in pairs if p[0] + p[1] not in vocab]
        if not candidates:
            raise RuntimeError(f"built-in word list yields only {len(merges)} of {num_merges} merges")
        best = min(candidates, key=lambda p: (-pairs[p], p))
        merges.append(best)
        vocab.add(best[0] + best[1])
        merged: dict[tuple[str, ...], int] = {}
        for sym, n in words.items():
            out: list[str] = []
            i = 0
            while i < len(sym):
                if i + 1 < len(sym) and (sym[i], sym[i + 1]) == best:
                    out.append(sym[i] + sym[i + 1])
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        words = merged
    return merges


def build_tokenizer() -> Tokenizer:
    """Build the tokenizer in memory: BPE, 8192 ids, the real special/audio id layout."""
    specials = list(SPECIAL_TOKENS) + [f"[{k}]" for k in range(NUM_AUDIO_TOKENS)]
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(specials)}
    for ch in ALPHABET:
        vocab[ch] = len(vocab)
    merges = _learn_merges(VOCAB_SIZE - len(vocab))
    for a, b in merges:
        vocab[a + b] = len(vocab)
    assert len(vocab) == VOCAB_SIZE, len(vocab)

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="[UNK]", fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(Regex(r"\s+"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Split(Regex(r"\s+|\w+|[^\w\s]+"), behavior="isolated", invert=False),
        ]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.enable_padding(direction="left", pad_id=vocab[PAD_TOKEN], pad_token=PAD_TOKEN)
    return tok


def _token_entry(content: str) -> dict[str, object]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def write_tokenizer_files(out_dir: Path | str, tokenizer: Tokenizer | None = None) -> list[Path]:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into ``out_dir``.

    The config makes ``transformers.AutoTokenizer`` load it as a left-padding
    ``PreTrainedTokenizerFast`` with ``[STOP]`` as pad/bos/eos, like the released model.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = tokenizer if tokenizer is not None else build_tokenizer()
    tok.save(str(out_dir / TOKENIZER_FILE))
    added = {str(i): {**_token_entry(t.content), "special": True} for i, t in sorted(tok.get_added_tokens_decoder().items())}
    config = {
        "added_tokens_decoder": added,
        "clean_up_tokenization_spaces": False,
        "extra_special_tokens": {},
        "max_length": None,
        "model_max_length": 2048,
        "pad_to_multiple_of": None,
        "pad_token": PAD_TOKEN,
        "pad_token_type_id": 0,
        "padding_side": "left",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "[UNK]",
        "bos_token": PAD_TOKEN,
        "eos_token": PAD_TOKEN,
    }
    paths = [out_dir / name for name in TOKENIZER_FILES]
    paths[1].write_text(json.dumps(config, indent=2) + "\n")
    paths[2].write_text(json.dumps({"pad_token": _token_entry(PAD_TOKEN)}, indent=2) + "\n")
    return paths
