"""LoRA / QLoRA for the LLM part only (PEFT), and saving an adapter in the kit's checkpoint layout.

Targets are a regex anchored on the LLM part's module names: PEFT matches plain names by suffix, so `q_proj`
alone would also wrap the vision tower's attention (DESIGN.md section 5 pitfalls).
"""

from __future__ import annotations

import logging
import os
import re

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from torch import nn

from ..checkpoint_layout import NON_LORA_FILE, write_adapter_base
from .stages import LoraSpec, part_attribute, unwrap

logger = logging.getLogger(__name__)

_PEFT_PREFIX = "base_model.model."


def _is_linear(module: nn.Module) -> bool:
    import bitsandbytes as bnb

    return isinstance(module, (nn.Linear, bnb.nn.Linear4bit))


def lora_target_regex(model: nn.Module, spec: LoraSpec) -> str:
    """A regex that fully matches the linear layers of the target part (its output head excluded).

    Returns:
        e.g. `language_model\\..*\\.(down_proj|gate_proj|...)` for `target="llm"`.
    """
    attr = part_attribute(model, spec.target)
    part = getattr(unwrap(model), attr)
    leaves = sorted({n.split(".")[-1] for n, m in part.named_modules() if _is_linear(m) and n != "lm_head"})
    if not leaves:
        raise ValueError(f"LoRA target part {spec.target!r} ({attr}) has no linear layers")
    return rf"{re.escape(attr)}\..*\.({'|'.join(map(re.escape, leaves))})"


def quantize_4bit(module: nn.Module) -> None:
    """Replace `module`'s linear layers (not `lm_head`) by bitsandbytes NF4 layers, in place (QLoRA)."""
    import bitsandbytes as bnb

    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and name != "lm_head":
            q = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=torch.float32,
                quant_type="nf4",
            )
            q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data, requires_grad=False)
            # moving a Params4bit to a real device is what quantizes it
            setattr(module, name, q.to(child.weight.device))
        elif not isinstance(child, nn.Linear):
            quantize_4bit(child)


def inject_lora(model: nn.Module, spec: LoraSpec) -> PeftModel:
    """Quantize the target part when `spec.load_in_4bit`, then add LoRA adapters to its linear layers.

    Returns:
        The PEFT-wrapped model; `unwrap(result)` is `model` with adapter layers inside the target part.
    """
    if spec.load_in_4bit:
        quantize_4bit(getattr(model, part_attribute(model, spec.target)))
    cfg = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=lora_target_regex(model, spec),
        bias="none",
    )
    return get_peft_model(model, cfg)


def save_lora_dir(model: PeftModel, state_dict: dict[str, torch.Tensor], path: str, base_dir: str) -> None:
    """Write adapter (PEFT layout) + non-LoRA trainables + base reference into `path`.

    Args:
        model: the PEFT-wrapped model (for its adapter config and which parameters train).
        state_dict: its full state dict (keys as `model.state_dict()`), gathered under ZeRO-3.
        path: the model dir of a checkpoint.
        base_dir: the full-weight base model dir this adapter applies to.
    """
    model.save_pretrained(path, state_dict=state_dict)
    trained = [n for n, p in unwrap(model).named_parameters() if p.requires_grad and "lora_" not in n]
    save_file({n: state_dict[_PEFT_PREFIX + n].contiguous() for n in trained}, os.path.join(path, NON_LORA_FILE))
    write_adapter_base(path, base_dir)
