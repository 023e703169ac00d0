"""Fetch a Soprano checkpoint (hub, local copy, or seeded random weights) and validate its layout.

Every source writes the upstream layout (see ``CHECKPOINT_FILES``) plus ``source.json``, atomically:
a failure leaves no output directory behind. ``validate_checkpoint`` reads every shape from the files,
so later stages never rely on hard-coded dimensions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline_lib.errors import CheckpointError
from pipeline_lib.fsutil import atomic_dir

REPO_ROOT = Path(__file__).resolve().parents[1]

CHECKPOINT_FILES: tuple[str, ...] = (
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "decoder.pth",
)
SOURCES = ("random", "hub", "local")
OFFLINE_CHOICES = "`checkpoint=random-80m`, `checkpoint=tiny`, or `checkpoint=local checkpoint.path=DIR`"

# The released LM config (ekwek/Soprano-80M); used when the shared fixture is absent, and equal to it.
SOPRANO_LM_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 3,
    "dtype": "bfloat16",
    "eos_token_id": 3,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 512,
    "initializer_range": 0.041666666666666664,
    "intermediate_size": 2304,
    "max_position_embeddings": 512,
    "max_window_layers": 17,
    "model_type": "qwen3",
    "num_attention_heads": 4,
    "num_hidden_layers": 17,
    "num_key_value_heads": 1,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 10000,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 8192,
}
GENERATION_CONFIG: dict[str, Any] = {"bos_token_id": 3, "eos_token_id": 3}

# Upstream SopranoDecoder() defaults; the ones not stored in decoder.pth are fixed by upstream code.
DECODER_DEFAULTS: dict[str, int] = {
    "input_channels": 512,
    "dim": 768,
    "intermediate_dim": 2304,
    "num_layers": 8,
    "n_fft": 2048,
    "dw_kernel": 3,
}
HOP_LENGTH = 512
UPSCALE = 4
SAMPLE_RATE = 32000
SPECIAL_TOKENS: tuple[str, ...] = ("[UNK]", "[TEXT]", "[START]", "[STOP]")
NUM_AUDIO_TOKENS = 8000


@dataclass
class CheckpointConfig:
    """One entry of the ``conf/checkpoint`` group.

    ``source`` is ``random`` (seeded weights of the real shapes), ``hub`` (download ``repo_id`` at
    ``revision``) or ``local`` (copy ``path``). ``num_layers`` None means the real 17 layers.
    ``tokenizer_fixture`` is resolved against the working directory, then the repo root.
    """

    name: str
    source: str
    repo_id: str | None = None
    revision: str | None = None
    path: str | None = None
    num_layers: int | None = None
    seed: int = 0
    lm_head_scale: float = 1.0
    tokenizer_fixture: str | None = None
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise CheckpointError(f"checkpoint {self.name!r}: source must be one of {SOURCES}, found {self.source!r}")
        if self.source == "hub" and not self.repo_id:
            raise CheckpointError(f"checkpoint {self.name!r}: source=hub needs repo_id")
        if self.num_layers is not None and self.num_layers < 1:
            raise CheckpointError(f"checkpoint {self.name!r}: num_layers must be >= 1 or null, found {self.num_layers}")

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any] | Any) -> CheckpointConfig:
        """Build from a dict or an OmegaConf ``DictConfig`` (e.g. ``cfg.checkpoint``); unknown keys are an error."""
        if type(m).__module__.startswith("omegaconf"):
            from omegaconf import OmegaConf

            # Item access on a DictConfig raises for "???"; the plain container keeps it as a string.
            m = OmegaConf.to_container(m, resolve=True, throw_on_missing=False)
        if not isinstance(m, Mapping):
            raise CheckpointError(f"checkpoint config must be a mapping, found {type(m).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(m) - known)
        if unknown:
            raise CheckpointError(f"checkpoint config has unknown keys {unknown}; known keys: {sorted(known)}")
        missing = [k for k in ("name", "source") if m.get(k) is None]
        if missing:
            raise CheckpointError(f"checkpoint config lacks required keys {missing}")
        # OmegaConf's "???" marks a value the user must give (checkpoint.path for local).
        values = {k: (None if v == "???" else v) for k, v in m.items()}
        return cls(**values)


@dataclass
class CheckpointInfo:
    """Shapes and ids read from a validated checkpoint directory."""

    path: Path
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    intermediate_size: int
    tie_word_embeddings: bool
    decoder_input_channels: int
    decoder_dim: int
    decoder_intermediate_dim: int
    decoder_num_layers: int
    n_fft: int
    dw_kernel: int
    unk_id: int
    text_id: int
    start_id: int
    stop_id: int
    audio_token_offset: int
    num_audio_tokens: int
    tokenizer_vocab_size: int
    # Not stored in the checkpoint: fixed by upstream code (SopranoDecoder defaults, 32 kHz audio).
    hop_length: int = HOP_LENGTH
    upscale: int = UPSCALE
    sample_rate: int = SAMPLE_RATE

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (path as a string)."""
        d = dataclasses.asdict(self)
        d["path"] = str(self.path)
        return d


def _missing_file_error(path: Path, name: str) -> CheckpointError:
    return CheckpointError(
        f"{path / name}: missing file {name}. An upstream Soprano checkpoint holds {', '.join(CHECKPOINT_FILES)}. "
        f"Fetch one with the pipeline's fetch stage ({OFFLINE_CHOICES} offline) or copy the missing file in."
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read JSON ({exc}); re-fetch the checkpoint") from exc


def expected_decoder_shapes(
    input_channels: int, dim: int, intermediate_dim: int, num_layers: int, n_fft: int, dw_kernel: int
) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an upstream ``SopranoDecoder`` state_dict with these dimensions, in upstream order."""
    shapes: dict[str, tuple[int, ...]] = {
        "decoder.embed.weight": (dim, input_channels, 1),
        "decoder.embed.bias": (dim,),
        "decoder.norm.weight": (dim,),
        "decoder.norm.bias": (dim,),
    }
    for i in range(num_layers):
        p = f"decoder.convnext.{i}."
        shapes.update(
            {
                p + "gamma": (dim,),
                p + "dwconv.weight": (dim, 1, dw_kernel),
                p + "dwconv.bias": (dim,),
                p + "norm.weight": (dim,),
                p + "norm.bias": (dim,),
                p + "pwconv1.weight": (intermediate_dim, dim),
                p + "pwconv1.bias": (intermediate_dim,),
                p + "pwconv2.weight": (dim, intermediate_dim),
                p + "pwconv2.bias": (dim,),
            }
        )
    shapes.update(
        {
            "decoder.final_layer_norm.weight": (dim,),
            "decoder.final_layer_norm.bias": (dim,),
            "head.out.weight": (n_fft + 2, dim),
            "head.out.bias": (n_fft + 2,),
            "head.istft.window": (n_fft,),
        }
    )
    return shapes


def _decoder_dims(found: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Read the dimensions from anchor tensors, falling back to upstream defaults where one is absent."""
    d = dict(DECODER_DEFAULTS)
    shape = found.get("decoder.embed.weight")
    if shape is not None and len(shape) == 3:
        d["dim"], d["input_channels"] = shape[0], shape[1]
    shape = found.get("decoder.convnext.0.pwconv1.weight")
    if shape is not None and len(shape) == 2:
        d["intermediate_dim"] = shape[0]
    shape = found.get("decoder.convnext.0.dwconv.weight")
    if shape is not None and len(shape) == 3:
        d["dw_kernel"] = shape[2]
    blocks = {int(m.group(1)) for k in found if (m := re.match(r"decoder\.convnext\.(\d+)\.", k))}
    if blocks:
        d["num_layers"] = max(blocks) + 1
    shape = found.get("head.out.weight")
    if shape is not None and len(shape) == 2:
        d["n_fft"] = shape[0] - 2
    return d


def _check_decoder(path: Path) -> dict[str, int]:
    import torch

    f = path / "decoder.pth"
    try:
        # mmap: only the headers are touched, the 30M parameters are not read.
        sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(f"{f}: cannot load decoder.pth as a torch state_dict ({exc}); re-fetch the checkpoint") from exc
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{f}: expected a state_dict (a mapping of tensors), found {type(sd).__name__}")
    found = {k: tuple(v.shape) for k, v in sd.items() if hasattr(v, "shape")}
    dims = _decoder_dims(found)
    expected = expected_decoder_shapes(**dims)
    for key, shape in expected.items():
        if key not in found:
            raise CheckpointError(
                f"{f}: decoder.pth does not match upstream SopranoDecoder: key {key!r} missing "
                f"(expected shape {list(shape)}, found none)"
            )
        if found[key] != shape:
            raise CheckpointError(
                f"{f}: decoder.pth does not match upstream SopranoDecoder: key {key!r} "
                f"expected shape {list(shape)}, found {list(found[key])}"
            )
    extra = [k for k in sd if k not in expected]
    if extra:
        raise CheckpointError(f"{f}: decoder.pth has unexpected key {extra[0]!r} (upstream SopranoDecoder has no such key)")
    return dims


def _check_lm_weights(path: Path, cfg: Mapping[str, Any]) -> None:
    from safetensors import safe_open

    f = path / "model.safetensors"
    h, v, hd = cfg["hidden_size"], cfg["vocab_size"], cfg["head_dim"]
    expected = {
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
        "model.layers.0.self_attn.q_proj.weight": (cfg["num_attention_heads"] * hd, h),
        "model.layers.0.self_attn.k_proj.weight": (cfg["num_key_value_heads"] * hd, h),
        "model.layers.0.self_attn.q_norm.weight": (hd,),
        "model.layers.0.mlp.gate_proj.weight": (cfg["intermediate_size"], h),
    }
    if not cfg.get("tie_word_embeddings", False):
        expected["lm_head.weight"] = (v, h)
    try:
        with safe_open(str(f), framework="pt") as st:
            keys = set(st.keys())
            for key, shape in expected.items():
                if key not in keys:
                    raise CheckpointError(f"{f}: tensor {key!r} missing (expected shape {list(shape)} from config.json)")
                got = tuple(st.get_slice(key).get_shape())
                if got != shape:
                    raise CheckpointError(
                        f"{f}: tensor {key!r} has shape {list(got)}, config.json implies {list(shape)}"
                    )
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{f}: cannot read model.safetensors ({exc}); re-fetch the checkpoint") from exc
    layers = {int(m.group(1)) for k in keys if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    if len(layers) != cfg["num_hidden_layers"]:
        raise CheckpointError(
            f"{f}: holds {len(layers)} decoder layers, config.json says num_hidden_layers={cfg['num_hidden_layers']}"
        )


def _check_tokenizer(path: Path, vocab_size: int) -> dict[str, int]:
    from tokenizers import Tokenizer

    f = path / "tokenizer.json"
    try:
        tok = Tokenizer.from_file(str(f))
    except Exception as exc:
        raise CheckpointError(f"{f}: cannot load tokenizer.json ({exc}); re-fetch the checkpoint") from exc
    for want, name in enumerate(SPECIAL_TOKENS):
        got = tok.token_to_id(name)
        if got != want:
            raise CheckpointError(
                f"{f}: special token {name} has id {got}, expected {want} "
                f"(Soprano needs ids 0..3 = {' '.join(SPECIAL_TOKENS)})"
            )
    offset = len(SPECIAL_TOKENS)
    for k in range(NUM_AUDIO_TOKENS):
        got = tok.token_to_id(f"[{k}]")
        if got != offset + k:
            raise CheckpointError(
                f"{f}: audio token [{k}] has id {got}, expected {offset + k} "
                f"(Soprano needs [0]..[{NUM_AUDIO_TOKENS - 1}] at ids {offset}..{offset + NUM_AUDIO_TOKENS - 1})"
            )
    size = tok.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise CheckpointError(f"{f}: tokenizer has {size} ids, more than the LM's vocab_size {vocab_size} in config.json")
    return {"size": size, "offset": offset}


def validate_checkpoint(path: Path | str) -> CheckpointInfo:
    """Check that ``path`` holds a usable upstream-layout Soprano checkpoint and return its shapes.

    Raises one ``CheckpointError`` naming the offending file for: a missing file, a config.json of
    another architecture, LM tensors that disagree with config.json, a decoder.pth whose keys or
    shapes differ from upstream ``SopranoDecoder``, decoder input channels != LM hidden size, or a
    tokenizer whose special / audio token ids are not where Soprano expects them.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist; fetch one first ({OFFLINE_CHOICES})")
    for name in CHECKPOINT_FILES:
        if not (path / name).is_file():
            raise _missing_file_error(path, name)

    cfg = _read_json(path / "config.json")
    archs = cfg.get("architectures") or []
    if "Qwen3ForCausalLM" not in archs or cfg.get("model_type") != "qwen3":
        raise CheckpointError(
            f"{path / 'config.json'}: expected architectures ['Qwen3ForCausalLM'] and model_type 'qwen3', "
            f"found architectures {archs} and model_type {cfg.get('model_type')!r}; this is not a Soprano LM"
        )
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
            "max_position_embeddings", "rms_norm_eps", "intermediate_size")
    absent = [k for k in keys if k not in cfg]
    if absent:
        raise CheckpointError(f"{path / 'config.json'}: lacks {absent}")
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    # transformers 5 writes rope_theta inside rope_parameters; older files have it at the top level.
    rope = cfg.get("rope_theta")
    if rope is None:
        rope = (cfg.get("rope_parameters") or {}).get("rope_theta")
    if rope is None:
        raise CheckpointError(f"{path / 'config.json'}: no rope_theta (top level or in rope_parameters)")

    dec = _check_decoder(path)
    if dec["input_channels"] != cfg["hidden_size"]:
        raise CheckpointError(
            f"{path / 'decoder.pth'}: decoder input channels {dec['input_channels']} != LM hidden_size "
            f"{cfg['hidden_size']} in config.json; the decoder and the LM come from different models"
        )
    _check_lm_weights(path, cfg)
    tok = _check_tokenizer(path, cfg["vocab_size"])
    for name in ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json"):
        _read_json(path / name)

    return CheckpointInfo(
        path=path,
        hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg["num_key_value_heads"],
        head_dim=cfg["head_dim"],
        vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg["max_position_embeddings"],
        rope_theta=float(rope),
        rms_norm_eps=float(cfg["rms_norm_eps"]),
        intermediate_size=cfg["intermediate_size"],
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        decoder_input_channels=dec["input_channels"],
        decoder_dim=dec["dim"],
        decoder_intermediate_dim=dec["intermediate_dim"],
        decoder_num_layers=dec["num_layers"],
        n_fft=dec["n_fft"],
        dw_kernel=dec["dw_kernel"],
        unk_id=0,
        text_id=1,
        start_id=2,
        stop_id=3,
        audio_token_offset=tok["offset"],
        num_audio_tokens=NUM_AUDIO_TOKENS,
        tokenizer_vocab_size=tok["size"],
    )


def _resolve_fixture(fixture: str | None) -> Path | None:
    """The fixture directory if it exists (relative paths: cwd first, then the repo root)."""
    if not fixture:
        return None
    p = Path(fixture)
    for cand in ([p] if p.is_absolute() else [Path.cwd() / p, REPO_ROOT / p]):
        if cand.is_dir():
            return cand.resolve()
    return None


def lm_config(num_layers: int | None = None, fixture_dir: Path | None = None) -> dict[str, Any]:
    """The LM config.json for random weights: the released one, fp32, optionally with fewer layers."""
    cfg = dict(SOPRANO_LM_CONFIG)
    if fixture_dir is not None and (fixture_dir / "config.json").is_file():
        cfg = _read_json(fixture_dir / "config.json")
    if num_layers is not None:
        cfg["num_hidden_layers"] = num_layers
        cfg["max_window_layers"] = num_layers
    cfg["dtype"] = "float32"
    return cfg


def random_decoder_state_dict(seed: int, **dims: int) -> dict[str, Any]:
    """A seeded state_dict with exactly upstream ``SopranoDecoder``'s keys and shapes (Vocos-style init)."""
    import torch

    d = {**DECODER_DEFAULTS, **dims}
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for key, shape in expected_decoder_shapes(**d).items():
        t = torch.empty(shape, dtype=torch.float32)
        if key == "head.istft.window":
            t = torch.hann_window(d["n_fft"], periodic=True, dtype=torch.float32)
        elif key.endswith(".gamma"):
            t.fill_(1.0 / math.sqrt(d["num_layers"]))
        elif key.endswith(".bias"):
            t.zero_()
        elif "norm" in key:
            t.fill_(1.0)
        else:
            torch.nn.init.trunc_normal_(t, std=0.02, generator=gen)
        sd[key] = t
    return sd


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_random(cfg: CheckpointConfig, out: Path) -> dict[str, Any]:
    import torch
    import transformers

    fixture = _resolve_fixture(cfg.tokenizer_fixture)
    lm_cfg = lm_config(cfg.num_layers, fixture)
    print(f"[checkpoint] random LM: {lm_cfg['num_hidden_layers']} layers, seed {cfg.seed}, lm_head x{cfg.lm_head_scale}")
    hf_cfg = transformers.Qwen3Config(**{k: v for k, v in lm_cfg.items() if k not in ("architectures", "model_type")})
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(cfg.seed)
        model = transformers.Qwen3ForCausalLM(hf_cfg).to(torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(cfg.lm_head_scale)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if not (Path(tmp) / "model.safetensors").is_file():
            raise CheckpointError(f"save_pretrained wrote {sorted(os.listdir(tmp))}, expected a single model.safetensors")
        shutil.move(str(Path(tmp) / "model.safetensors"), out / "model.safetensors")
    del model
    # Our own config/generation files: the upstream content, not transformers' expanded defaults.
    _write_json(out / "config.json", lm_cfg)
    _write_json(out / "generation_config.json", GENERATION_CONFIG)
    print("[checkpoint] random decoder")
    torch.save(random_decoder_state_dict(cfg.seed), out / "decoder.pth")

    if fixture is not None and (fixture / "tokenizer.json").is_file():
        print(f"[checkpoint] tokenizer from fixture {fixture}")
        from pipeline_lib.registry import TOKENIZER_FILES

        for name in TOKENIZER_FILES:
            shutil.copyfile(fixture / name, out / name)
        tok_origin = "fixture"
    else:
        print("[checkpoint] generated tokenizer")
        from pipeline_lib.tokenizer_gen import write_tokenizer_files

        write_tokenizer_files(out)
        tok_origin = "generated"
    return {"random_weights": True, "tokenizer": tok_origin, "num_layers": lm_cfg["num_hidden_layers"]}


def _hub_error(cfg: CheckpointConfig, why: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {cfg.name!r}: the Hugging Face hub could not be reached for {cfg.repo_id}@{cfg.revision} ({why}). "
        f"Offline choices: {OFFLINE_CHOICES}"
    )


def _download_hub(cfg: CheckpointConfig, dest: Path) -> str:
    """Download the checkpoint files into ``dest``; return the resolved commit hash. Bounded by cfg.timeout_s."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise _hub_error(cfg, "HF_HUB_OFFLINE is set")
    # These are read when huggingface_hub is first imported; the thread join below is the real deadline.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(int(cfg.timeout_s)))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(cfg.timeout_s)))
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            import huggingface_hub

            sha = huggingface_hub.HfApi().model_info(cfg.repo_id, revision=cfg.revision).sha
            huggingface_hub.snapshot_download(
                cfg.repo_id, revision=sha or cfg.revision, allow_patterns=list(CHECKPOINT_FILES), local_dir=dest
            )
            result["sha"] = sha or cfg.revision
        except BaseException as exc:  # handed to the caller's thread
            result["error"] = exc

    # A daemon thread: a hung connection cannot keep the process alive past the deadline.
    worker = threading.Thread(target=work, name="hub-download", daemon=True)
    worker.start()
    worker.join(cfg.timeout_s)
    if worker.is_alive():
        raise _hub_error(cfg, f"no answer within {cfg.timeout_s:g} s")
    if "error" in result:
        exc = result["error"]
        raise _hub_error(cfg, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    return str(result["sha"])


def fetch_checkpoint(cfg: CheckpointConfig, out_dir: Path | str) -> Path:
    """Write the checkpoint described by ``cfg`` into ``out_dir`` (atomically) and validate it.

    Output: the upstream files (``CHECKPOINT_FILES``) plus ``source.json`` (name, source, repo_id,
    revision — the resolved commit for hub — seed, num_layers, random_weights, tokenizer origin).
    Returns ``out_dir``. Raises ``CheckpointError``; on any failure ``out_dir`` is left absent
    (an older one is replaced only on success).
    """
    out_dir = Path(out_dir)
    print(f"[checkpoint] {cfg.name} (source={cfg.source}) -> {out_dir}")
    source: dict[str, Any] = {
        "name": cfg.name,
        "source": cfg.source,
        "repo_id": cfg.repo_id,
        "revision": cfg.revision,
        "seed": cfg.seed if cfg.source == "random" else None,
        "lm_head_scale": cfg.lm_head_scale if cfg.source == "random" else None,
    }
    if cfg.source == "local":
        if not cfg.path:
            raise CheckpointError(f"checkpoint {cfg.name!r}: source=local needs checkpoint.path=DIR")
        src = Path(cfg.path).expanduser()
        validate_checkpoint(src)
        source["path"] = str(src.resolve())
    with atomic_dir(out_dir) as tmp:
        if cfg.source == "random":
            source.update(_write_random(cfg, tmp))
        elif cfg.source == "hub":
            print(f"[checkpoint] downloading {cfg.repo_id}@{cfg.revision} (timeout {cfg.timeout_s:g} s)")
            with tempfile.TemporaryDirectory(dir=tmp) as dl:
                source["revision"] = _download_hub(cfg, Path(dl))
                for name in CHECKPOINT_FILES:
                    if not (Path(dl) / name).is_file():
                        raise _missing_file_error(Path(f"{cfg.repo_id}@{source['revision']}"), name)
                    shutil.move(str(Path(dl) / name), tmp / name)
            source.update({"random_weights": False, "tokenizer": "checkpoint"})
        else:
            print(f"[checkpoint] copying {src}")
            for name in CHECKPOINT_FILES:
                shutil.copyfile(src / name, tmp / name)
            # A local copy of a random checkpoint stays marked as random, so reports keep saying so.
            prior = _read_json(src / "source.json") if (src / "source.json").is_file() else {}
            source.update({"random_weights": bool(prior.get("random_weights", False)), "tokenizer": "checkpoint"})
            if prior:
                source["origin"] = prior
        info = validate_checkpoint(tmp)
        source["num_layers"] = info.num_layers
        _write_json(tmp / "source.json", source)
    print(f"[checkpoint] ok: {info.num_layers} layers, hidden {info.hidden_size}, vocab {info.vocab_size}, n_fft {info.n_fft}")
    return out_dir
