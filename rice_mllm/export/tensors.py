"""Weights on disk for export and import: read safetensors, rename keys by prefix, write a model directory.

Invariant: every tensor is renamed by exactly one rule or the conversion stops, naming it (nothing is dropped).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint_layout import WEIGHTS_FILE, weight_files


def rename_keys(state_dict: dict[str, torch.Tensor], mapping: dict[str, str]) -> dict[str, torch.Tensor]:
    """Rename every key by its longest matching prefix in `mapping`; a key no prefix matches raises, named."""
    renamed = {}
    for key, tensor in state_dict.items():
        prefixes = [prefix for prefix in mapping if key.startswith(prefix)]
        if not prefixes:
            raise KeyError(f"no mapping for tensor {key!r}; known prefixes: {sorted(mapping)}")
        prefix = max(prefixes, key=len)
        renamed[mapping[prefix] + key[len(prefix) :]] = tensor
    return renamed


def read_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a directory's safetensors file(s) (one file, or shards listed by an index)."""
    weights: dict[str, torch.Tensor] = {}
    for file in weight_files(model_dir):
        weights.update(load_file(str(file)))
    return weights


def write_model(state_dict: dict[str, torch.Tensor], config, out_dir: Path) -> None:
    """`model.safetensors` and `config.json` (from `config.save_pretrained`) in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors that share memory (tied embeddings): store contiguous copies.
    tensors = {key: tensor.contiguous().clone() for key, tensor in state_dict.items()}
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    config.save_pretrained(out_dir)
