"""Strict checkpoint loading: a checkpoint must hold exactly the model's tensors, with the model's shapes.

transformers only logs missing and unexpected keys (and re-initialises them), which is how peers end up training
from a silently half-random model. The kit checks the safetensors headers first and raises with the key names.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .checkpoint_layout import weight_files, weight_shapes


class CheckpointMismatchError(ValueError):
    """A checkpoint whose tensors do not match the model: missing, unexpected or wrongly shaped keys."""


def verify_checkpoint(model: nn.Module, shapes: dict[str, tuple[int, ...]], prefix: str = "") -> None:
    """Raise CheckpointMismatchError unless `shapes` covers exactly the model's state dict.

    Args:
        model: the model (any device, `meta` included) whose state dict the checkpoint must fill.
        shapes: checkpoint key -> shape.
        prefix: added to checkpoint keys that lack it (transformers saves MLCD without `vision_model.`).
    """
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    # Tied weights (an LM head sharing the embedding) appear once in named_parameters and may be saved once.
    required = {name for name, _ in model.named_parameters()} | {
        name for name in expected if name not in dict(model.named_parameters(remove_duplicate=False))
    }
    found = {(key if key.startswith(prefix) else prefix + key): shape for key, shape in shapes.items()}
    missing = sorted(required - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    mismatched = sorted(
        f"{key}: checkpoint {list(found[key])} vs model {list(expected[key])}"
        for key in expected.keys() & found.keys()
        if found[key] != expected[key]
    )
    if missing or unexpected or mismatched:
        parts = [
            f"{label} ({len(keys)}): {', '.join(keys[:20])}{' ...' if len(keys) > 20 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
            if keys
        ]
        raise CheckpointMismatchError("checkpoint does not match the model; " + "; ".join(parts))


def verify_checkpoint_dir(model_class, config, checkpoint_dir: Path, prefix: str = "") -> None:
    """Build `model_class(config)` on the meta device (no memory) and verify the directory's weights against it."""
    with torch.device("meta"):
        skeleton = model_class(config)
    try:
        verify_checkpoint(skeleton, weight_shapes(weight_files(checkpoint_dir)), prefix)
    except CheckpointMismatchError as error:
        raise CheckpointMismatchError(f"{checkpoint_dir}: {error}") from None
