"""Training stages as data: which parts of the model train, at which learning rate (DESIGN.md section 5).

A part is a top-level submodule (or parameter) of the model, found through the model's own `parts` table
(contract.TrainableModel); training code never reaches deeper. Applying a stage freezes everything, then unfreezes
exactly the stage's parts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraSpec:
    r: int
    alpha: int
    lr: float
    target: str = "llm"  # the part whose linear layers get adapters
    dropout: float = 0.05
    load_in_4bit: bool = False  # QLoRA: the target part's linear weights are stored in bitsandbytes NF4


@dataclass(frozen=True)
class Stage:
    train: dict[str, float]  # part -> lr, always trained
    optional: dict[str, float] = field(default_factory=dict)  # part -> lr, trained when the config asks
    lora: LoraSpec | None = None


_LORA = LoraSpec(r=128, alpha=256, lr=2e-4)

# image_newline in stage 1: LLaVA-NeXT creates it only at stage 2 because its stage 1 feeds flat, untiled
# features. The kit's model always tiles and ends every feature row with the newline, so stage 1 already
# feeds it to the LLM; it trains with the projector, which keeps the feature layout identical across stages.
STAGES: dict[str, Stage] = {
    "stage0_pretrain": Stage(
        train={"encoder": 1e-3, "region_head": 1e-3, "object_centres": 1e-3}, optional={"ocr_centres": 1e-3}
    ),
    "stage1_align": Stage(train={"projector": 1e-3, "newline": 1e-3}),
    "stage2_instruct": Stage(train={"projector": 1e-5, "llm": 1e-5, "newline": 1e-5}, optional={"vision": 2e-6}),
    "lora": Stage(train={"projector": 2e-5, "newline": 2e-5}, lora=_LORA),
    "qlora": Stage(
        train={"projector": 2e-5, "newline": 2e-5},
        lora=LoraSpec(r=_LORA.r, alpha=_LORA.alpha, lr=_LORA.lr, load_in_4bit=True),
    ),
}


def get_stage(name: str) -> Stage:
    """Return the stage called `name`; KeyError lists the valid names."""
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; valid stages: {sorted(STAGES)}")
    return STAGES[name]


def unwrap(model: nn.Module) -> nn.Module:
    """The model whose top-level attributes are the parts (a PEFT wrapper exposes it via get_base_model)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def part_attribute(model: nn.Module, part: str) -> str:
    """The model's top-level attribute that holds `part`.

    Raises:
        KeyError: the model has no such part, listing the ones it has.
    """
    parts = unwrap(model).parts
    if part not in parts:
        raise KeyError(f"unknown part {part!r}; {type(unwrap(model)).__name__} has parts {sorted(parts)}")
    return parts[part]


def part_parameters(model: nn.Module, part: str) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs of one part, names relative to the part, in a fixed order.

    Raises:
        KeyError: the model has no such part, or its attribute is not a module or parameter.
    """
    attr = part_attribute(model, part)
    obj = getattr(unwrap(model), attr, None)
    if isinstance(obj, nn.Parameter):
        return [("", obj)]
    if isinstance(obj, nn.Module):
        return list(obj.named_parameters())
    raise KeyError(f"part {part!r}: the model has no attribute {attr!r} (a module or parameter)")


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # biases, norm weights and vectors such as image_newline are 1-D: decaying them only shrinks them to 0
    return param.ndim < 2 or name.endswith("bias")


def _used_part_parameters(model: nn.Module, part: str) -> list[tuple[str, nn.Parameter]]:
    """A part's parameters less those the model lists as unused (vision blocks past the feature layer): training
    them would leave ZeRO/DDP waiting for gradients, and weight decay would still move them, so they stay frozen."""
    unused = set(unwrap(model).unused_parameter_names())
    attr = part_attribute(model, part)
    return [(n, p) for n, p in part_parameters(model, part) if f"{attr}.{n}".rstrip(".") not in unused]


def _trained_parameters(model: nn.Module, stage: Stage, lrs: dict[str, float]) -> list[tuple[str, float, list]]:
    """(group name, lr, named parameters) for each trained part, and the LoRA adapters of a LoRA stage."""
    chosen = [(part, lr, _used_part_parameters(model, part)) for part, lr in lrs.items()]
    if stage.lora is not None:
        adapters = [(n, p) for n, p in part_parameters(model, stage.lora.target) if "lora_" in n]
        if not adapters:
            raise ValueError(f"LoRA stage but part {stage.lora.target!r} holds no lora_ parameters: inject LoRA first")
        chosen.append(("lora", stage.lora.lr, adapters))
    return chosen


def apply_stage(
    model: nn.Module, stage: Stage, optional_parts: list[str] = (), weight_decay: float = 0.0, lr_scale: float = 1.0
) -> list[dict]:
    """Freeze the whole model, unfreeze the stage's parts, and build optimizer parameter groups.

    Parameters listed by the model's `unused_parameter_names()` stay frozen.
    With a LoRA stage the adapters (parameters named `lora_` inside the LoRA target part) train at the
    LoRA lr and the rest of that part stays frozen.

    Args:
        model: a contract.TrainableModel (possibly PEFT-wrapped).
        stage: the stage table.
        optional_parts: names from `stage.optional` to train as well.
        weight_decay: applied to >=2-D weights; biases and 1-D parameters get 0.
        lr_scale: multiplies every learning rate of the table, keeping their ratios (a model trained from scratch,
            like the tiny world's, needs far larger steps than the 7B-scale table).

    Returns:
        torch.optim parameter groups, each with `name`, `params`, `lr` and `weight_decay`; empty groups are left out.

    Raises:
        KeyError: an optional part the stage does not offer, or a part the model lacks.
        ValueError: the stage leaves nothing trainable.
    """
    bad = [p for p in optional_parts if p not in stage.optional]
    if bad:
        raise KeyError(f"optional part {bad[0]!r} not offered by this stage; it offers {sorted(stage.optional)}")
    lrs = dict(stage.train) | {p: stage.optional[p] for p in optional_parts}
    for p in model.parameters():
        p.requires_grad_(False)
    groups = []
    for part, lr, named in _trained_parameters(model, stage, lrs):
        for _, p in named:
            p.requires_grad_(True)
        decay = [p for n, p in named if not _no_decay(n, p)]
        plain = [p for n, p in named if _no_decay(n, p)]
        groups += [
            {"name": part, "params": decay, "lr": float(lr) * lr_scale, "weight_decay": weight_decay},
            {"name": f"{part}_no_decay", "params": plain, "lr": float(lr) * lr_scale, "weight_decay": 0.0},
        ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the stage leaves no parameter trainable")
    return groups


def parameter_table(model: nn.Module) -> str:
    """A table of trainable / total parameters per part (ZeRO-3 partitioned sizes counted in full) and a memory line."""

    def count(named: list[tuple[str, nn.Parameter]]) -> tuple[int, int]:
        sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for _, p in named]
        return sum(n for n, t in sizes if t), sum(n for n, _ in sizes)

    rows = []
    for part, attr in unwrap(model).parts.items():
        if getattr(unwrap(model), attr, None) is not None:
            rows.append((part, *count(part_parameters(model, part))))
    mapped = {unwrap(model).parts[r[0]] for r in rows}
    rest = [(n, p) for n, p in unwrap(model).named_parameters() if n.split(".")[0] not in mapped]
    if rest:
        rows.append(("(other)", *count(rest)))
    rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows)))
    lines = [f"{'part':<12}{'trainable':>14}{'total':>14}"]
    lines += [f"{name:<12}{train:>14,}{total:>14,}" for name, train, total in rows]
    weights = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in model.parameters())
    # per trainable parameter: fp32 gradient + two fp32 AdamW moments (+ an fp32 master copy under bf16 ZeRO)
    states = rows[-1][1] * (4 + 8)
    lines.append(
        f"memory before activations and ZeRO sharding: weights {weights / 2**30:.2f} GiB + "
        f"grads/AdamW {states / 2**30:.2f} GiB"
    )
    return "\n".join(lines)
