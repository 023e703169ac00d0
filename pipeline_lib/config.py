"""Hydra composition of conf/ into the params that DVC stages read."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose(overrides: Sequence[str] = (), conf_dir: Path = CONF_DIR) -> dict[str, Any]:
    """Compose conf/config.yaml with Hydra overrides (as `dvc exp run -S` does) into a plain dict."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)  # as DVC writes params.yaml


def write_params(path: Path, overrides: Sequence[str] = ()) -> None:
    import yaml

    path.write_text(yaml.safe_dump(compose(overrides), sort_keys=False))


if __name__ == "__main__":
    import sys

    write_params(Path("params.yaml"), sys.argv[1:])
