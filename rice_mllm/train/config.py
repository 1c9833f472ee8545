"""Training configuration: typed dataclasses loaded from YAML plus `a.b=value` command-line overrides.

Draccus-like semantics without the dependency (STYLE.md section 4): every value is checked against the
dataclass field type, and an unknown key raises naming the key and listing the valid ones.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..mllm.anyres import DEFAULT_MULTI_IMAGE_TILING
from ..mllm.chat_template import DEFAULT_TEMPLATE
from ..pretrain.modeling import RegionLossSettings


@dataclass
class ModelConfig:
    vision: str = "rice-vit-tiny"  # RICE-ViT preset name (random init), directory or hub id
    llm: str = "qwen2.5-tiny"  # Qwen2.5 preset name (random init), directory or hub id
    tokenizer: str | None = None  # None: the LLM's own (the kit's tiny tokenizer for an LLM preset)
    init_from: str | None = None  # kit checkpoint (model, checkpoint or run dir); then vision/llm/tokenizer unused
    # anyres grids: "llava-next" (1x2, 2x1, 2x2, 3x1, 1x3), "(1x1),...,(3x3)", "anyres_max_9" (OneVision: 1x1-6x6 with
    # a budget of 9 tiles) or [[height, width], ...] pixels; null: every grid of at most max_tiles tiles
    image_grid_pinpoints: list[list[int]] | str | None = None
    max_tiles: int | None = None  # with image_grid_pinpoints null: grids of at most this many tiles (null: 4)
    max_grid_tiles: int | None = None  # token budget: OneVision's anyres_max_K
    # "base": the images of multi-image samples give their base tile only
    multi_image_tiling: str = DEFAULT_MULTI_IMAGE_TILING
    # a <|region_pad|> token after each box of a user turn carries the box's RICE region feature (set at stage 1);
    # null: off for a new model, the checkpoint's own with init_from
    region_tokens: bool | None = None
    # "mlp2x_gelu" (LLaVA: a token per patch), "patch_merger" (LLaVA-OneVision-1.5: a token per 2x2 patches, a
    # quarter of the image tokens) or "mlp2x_gelu_block" (a token per patch that also sees its 2x2 block); the last
    # two do not export to transformers' LLaVA classes; null: mlp2x_gelu for a new model, the checkpoint's own with
    # init_from
    projector: str | None = None
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute
    # the LLM's attention: "sdpa_per_sample" (packed rows attend per sample, any device), "flash_attention_2" (needs
    # flash-attn and bf16; padded batches only), "sdpa" (transformers' default: a packed row attends as a whole under
    # a mask), or "auto": flash_attention_2 where it can run, else sdpa_per_sample
    attn_implementation: str = "auto"


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)  # LLaVA .json / .jsonl; stage 0: region .jsonl
    image_folder: str | None = None  # relative image paths resolve here; None: against each data file's folder
    max_length: int = 2048  # longer samples raise (never truncated through an image)
    template: str = DEFAULT_TEMPLATE  # "chatml" or "plain" (LLaVA's alignment template: image tokens, caption, "\n")
    num_workers: int = 0
    pack_max_tokens: int | None = None  # padding-free: pack each micro-batch's samples into rows of this many tokens
    group_by_length: bool = False  # batch records of similar token length (less padding; LLaVA's group_by_length)
    tiny_world: str | None = None  # generate the kit's tiny world into this folder first (skipped when present)
    tiny_world_images: int = 256


@dataclass
class PretrainConfig(RegionLossSettings):
    """Stage 0 only (`stage: stage0_pretrain`): region labelling and sampling, plus the head and loss settings it
    inherits (embed_dim, scale, margin, sample_ratio, ocr_sample_ratio, ocr_loss_weight, rope_jitter; DESIGN.md
    section 4)."""

    teacher: str | None = None  # label the region file first: "label-hash" (tiny world) or an encoder dir; None: done
    num_clusters: int | None = None  # K; None: #distinct labels (label-hash) or max "cluster" + 1 (labelled files)
    num_regions: int = 10  # regions per image
    max_tokens: int = 10  # token positives kept per OCR region
    max_patches: int | None = None  # keep images' aspect ratio within this many patches; None: square image_size


@dataclass
class OptimConfig:
    weight_decay: float = 0.0
    lr_scale: float = 1.0  # multiplies the stage table's learning rates (stages.py), keeping their ratios
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"
    epochs: int = 1
    max_steps: int | None = None  # when set, overrides epochs
    batch_size: int = 1  # per device
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    seed: int = 0
    bf16: bool = False


@dataclass
class TrainConfig:
    stage: str = "stage1_align"
    optional_parts: list[str] = field(default_factory=list)  # parts of the stage's `optional` table to train
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    deepspeed: str | None = None  # JSON path, relative to the YAML's folder; None = plain torch, one process
    output_dir: str = "outputs/run"
    save_steps: int = 500
    save_total_limit: int | None = None
    logging_steps: int = 1
    resume: str | None = None  # "auto" (last complete checkpoint, if any), a checkpoint path, or None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting strings from the command line."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        for option in inner[:-1]:  # the first type that fits, in the order the annotation lists them
            try:
                return _coerce(value, option, key)
            except TypeError:
                pass
        return _coerce(value, inner[-1], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise TypeError(f"config key {key!r}: expected a mapping, got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    if origin is list:
        if isinstance(value, str):  # command line: `a=x,y` or `a=[x, y]`
            value = yaml.safe_load(value) if value.startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise TypeError(f"config key {key!r}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
    elif tp in (int, float):
        # YAML reads `1e-3` as a string; int fields refuse fractions instead of truncating them
        try:
            number = float(value) if tp is float else int(str(value))
        except ValueError:
            number = None
        if number is not None and not isinstance(value, bool):
            return number
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise TypeError(f"config key {key!r}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in valid]
    if unknown:
        raise KeyError(f"unknown config key {prefix + unknown[0]!r}; valid keys here: {[prefix + v for v in valid]}")
    return cls(**{k: _coerce(v, hints[k], prefix + k) for k, v in values.items()})


def _set_path(tree: dict, dotted: str, value: str) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
        if not isinstance(tree, dict):
            raise KeyError(f"override {dotted!r}: {p!r} is not a section")
    tree[leaf] = value


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML file (or the defaults when `path` is None) and apply `a.b=value` overrides.

    A relative `deepspeed` path is resolved against the YAML's folder, so a recipe names its sibling JSON; other
    relative paths (data, output, init_from) are relative to the working directory.

    Raises:
        KeyError: an unknown key, naming it and the valid keys at that level.
        TypeError: a value that does not fit the field type.
    """
    tree: dict = {}
    if path is not None:
        with open(path) as f:
            tree = yaml.safe_load(f) or {}
        if not isinstance(tree, dict):
            raise TypeError(f"{path}: top level must be a mapping, got {type(tree).__name__}")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like a.b=value")
        key, value = item.split("=", 1)
        _set_path(tree, key.strip(), value)
    config = _build(TrainConfig, tree)
    if path is not None and config.deepspeed and not os.path.isabs(config.deepspeed):
        config.deepspeed = os.path.join(os.path.dirname(os.path.abspath(path)), config.deepspeed)
    return config


def save_config(config: TrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML; `load_config(path)` reads back an equal config."""
    with open(path, "w") as f:
        yaml.safe_dump(dataclasses.asdict(config), f, sort_keys=False)
