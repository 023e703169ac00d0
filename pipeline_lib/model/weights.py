"""Loading a state_dict into a reference module with every key and shape checked first."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from pipeline_lib.errors import CheckpointError


def load_checked(model: nn.Module, weights: Mapping[str, torch.Tensor], path: Path, hint: str) -> nn.Module:
    """Load ``weights`` (as fp32) into ``model``; a missing key or another shape is a CheckpointError
    naming ``path``, the key, the expected and the found shape, and ``hint`` (what the mismatch means)."""
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in weights:
            raise CheckpointError(f"{path}: '{key}' is missing (expected shape {tuple(tensor.shape)}); {hint}.")
        if tuple(weights[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{path}: '{key}' has shape {tuple(weights[key].shape)}, expected {tuple(tensor.shape)}; {hint}."
            )
    model.load_state_dict({k: weights[k].float() for k in expected})
    return model.eval()
