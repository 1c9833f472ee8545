"""Strict checkpoint loading: a checkpoint must hold exactly the model's tensors, with the model's shapes.

transformers only logs missing and unexpected keys (and re-initialises them), which is how peers end up training
from a silently half-random model. The kit checks the safetensors headers first and raises with the key names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


class CheckpointMismatchError(ValueError):
    """A checkpoint whose tensors do not match the model: missing, unexpected or wrongly shaped keys."""


def resolve_checkpoint_dir(name_or_path: str | os.PathLike) -> Path:
    """A local directory as is, otherwise a hub id fetched (config, tokenizer and safetensors files only)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).startswith((".", "/")) or str(name_or_path).count("/") != 1:
        raise FileNotFoundError(f"checkpoint directory not found: {name_or_path}")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))


def weight_files(checkpoint_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (single file or sharded with an index)."""
    single = checkpoint_dir / WEIGHTS_NAME
    if single.is_file():
        return [single]
    index = checkpoint_dir / WEIGHTS_INDEX_NAME
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [checkpoint_dir / shard for shard in shards]
    present = sorted(p.name for p in checkpoint_dir.iterdir())[:12]
    raise FileNotFoundError(f"{checkpoint_dir} has no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}; it holds {present}")


def checkpoint_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Key -> shape, read from the safetensors headers without loading tensors."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


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
        verify_checkpoint(skeleton, checkpoint_shapes(weight_files(checkpoint_dir)), prefix)
    except CheckpointMismatchError as error:
        raise CheckpointMismatchError(f"{checkpoint_dir}: {error}") from None
