"""Fetch a Soprano checkpoint (hub, local copy, or seeded random weights) into a folder.

Every source writes the upstream layout (``checkpoint_checks.CHECKPOINT_FILES``) plus ``source.json``,
atomically: a failure leaves no output directory behind. What is written is checked with
``checkpoint_checks.validate_checkpoint`` before it is kept (a local source is checked before the copy too).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline_lib.checkpoint_checks import (
    CHECKPOINT_FILES,
    DECODER_DEFAULTS,
    OFFLINE_CHOICES,
    _missing_file_error,
    _read_json,
    expected_decoder_shapes,
    validate_checkpoint,
)
from pipeline_lib.errors import CheckpointError
from pipeline_lib.fsutil import atomic_dir

REPO_ROOT = Path(__file__).resolve().parents[1]

SOURCES = ("random", "hub", "local")

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
