"""What a training run is built from: its inputs (the processor), model, dataset and collator, each from the config.

The trainer reaches the model, processor and data only through these four functions (bundled in `Builders`, which
stage 0 and tests replace to run the same loop on other models). Invariant: building is deterministic given the seed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import ConcatDataset, Dataset
from transformers.utils import is_flash_attn_2_available

from ..checkpoint_layout import check_model_dir, full_model_dir, resolve_model_dir
from ..data.collate import PaddingCollator
from ..data.conversation_shards import ConversationShards
from ..data.dataset import ConversationDataset
from ..data.packing import PackingCollator
from ..data.shards import is_shards
from ..data.sources import Conversation, load_conversations
from ..mllm.assembly import TINY_TOKENIZER, assemble_model, build_processor
from ..mllm.modeling import RiceMllmForConditionalGeneration
from ..mllm.per_sample_attention import PER_SAMPLE_SDPA
from ..mllm.processing import RiceMllmProcessor
from ..mllm.projector import DEFAULT_PROJECTOR_TYPE
from ..presets import list_presets, load_preset
from ..vision import RiceVisionModel
from .config import TrainConfig
from .engine import barrier, rank

logger = logging.getLogger(__name__)
ATTN_IMPLEMENTATIONS = ("auto", PER_SAMPLE_SDPA, "flash_attention_2", "sdpa")


def _init_dir(config: TrainConfig) -> Path:
    """The full model folder `model.init_from` names, checked (intact weights, one tiling geometry)."""
    model_dir = full_model_dir(config.model.init_from, "model.init_from")
    check_model_dir(model_dir)
    return model_dir


def vision_source(config: TrainConfig) -> str:
    """`model.vision` as a preset name, hub id or model dir: a local run or checkpoint dir (e.g. a stage-0 run)
    resolves to its last checkpoint's `model/`."""
    vision = config.model.vision
    if vision not in list_presets() and Path(vision).is_dir():
        return str(resolve_model_dir(vision))
    return vision


def llm_tokenizer(config: TrainConfig) -> str:
    """`model.tokenizer`, else the kit's tiny tokenizer for an LLM preset, else the LLM's own (dir or hub id)."""
    m = config.model
    return str(m.tokenizer or (TINY_TOKENIZER if m.llm in list_presets() else m.llm))


def prepare_tiny_world(config: TrainConfig) -> None:
    """Generate the kit's tiny world into `data.tiny_world` (when set and not already there), on rank 0."""
    d = config.data
    if d.tiny_world is not None:
        from ..data.synthetic import generate

        if rank() == 0:  # the generator is not safe to run from several processes at once
            # the world's own seed stays fixed: a training seed must not regenerate the data other stages use
            generate(d.tiny_world, num_images=d.tiny_world_images, reuse_existing=True)
        barrier()


def run_processor(config: TrainConfig) -> RiceMllmProcessor:
    """The checkpoint's processor (`model.init_from`), else one over `model.tokenizer` with the tower's tile size
    and the `model.*` grid settings.

    `data.max_length` and `data.template` always apply: longer samples are refused by the processor, never truncated,
    and each stage renders with its own template (stage 1 plain, stage 2 ChatML over a stage-1 checkpoint).
    """
    m, d = config.model, config.data
    if m.init_from is not None:
        fixed = {
            "image_grid_pinpoints": m.image_grid_pinpoints,
            "max_tiles": m.max_tiles,
            "max_grid_tiles": m.max_grid_tiles,
            "region_tokens": m.region_tokens,
            "projector": m.projector,
        }
        if given := [f"model.{key}" for key, value in fixed.items() if value is not None]:
            raise ValueError(f"{given} set, but model.init_from={m.init_from} fixes them: drop them")
        loaded = RiceMllmProcessor.from_pretrained(_init_dir(config))
        return RiceMllmProcessor(
            loaded.tokenizer, loaded.image_processor, d.max_length, d.template, loaded.region_tokens
        )
    source = vision_source(config)
    if source in list_presets():
        vision = load_preset(source)
    else:
        vision = RiceVisionModel.config_class.from_pretrained(source).to_dict()
    return build_processor(
        llm_tokenizer(config),
        tile_size=vision["image_size"],
        patch_size=vision["patch_size"],
        max_tiles=m.max_tiles,
        max_grid_tiles=m.max_grid_tiles,
        max_length=d.max_length,
        multi_image_tiling=m.multi_image_tiling,
        image_grid_pinpoints=m.image_grid_pinpoints,
        template=d.template,
        region_tokens=bool(m.region_tokens),
        projector_type=new_model_projector(config),
    )


def new_model_projector(config: TrainConfig) -> str:
    """`model.projector` of a model assembled from parts (null: LLaVA's mlp2x_gelu)."""
    return config.model.projector or DEFAULT_PROJECTOR_TYPE


def build_model(config: TrainConfig, processor: RiceMllmProcessor) -> nn.Module:
    """The kit checkpoint `model.init_from`, else a model assembled from `model.vision` and `model.llm`
    (preset names start random; paths / hub ids load their weights; projector and image_newline start random); its
    LLM attends with `model.attn_implementation`."""
    if config.model.init_from is not None:
        model = RiceMllmForConditionalGeneration.from_pretrained(_init_dir(config))
    else:
        model = assemble_model(vision_source(config), config.model.llm, processor, new_model_projector(config))
    model.set_llm_attn_implementation(llm_attn_implementation(config))
    return model


def llm_attn_implementation(config: TrainConfig) -> str:
    """`model.attn_implementation`, with "auto" resolved: flash-attn where it can run (installed, a CUDA device,
    bf16) on padded batches, else per-sample SDPA, which packed rows need to skip cross-sample attention.

    Raises:
        ValueError: an unknown name, or flash_attention_2 with packing: transformers' flash-attn path finds packed
            samples only in a batch of one row, so several rows would silently attend across samples.
    """
    choice = config.model.attn_implementation
    if choice not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"model.attn_implementation={choice!r}: choose one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    packed = config.data.pack_max_tokens is not None
    if choice == "flash_attention_2" and packed:
        raise ValueError(
            "model.attn_implementation=flash_attention_2 with data.pack_max_tokens: transformers' flash-attn path "
            f"keeps packed samples apart only in one-row batches; use {PER_SAMPLE_SDPA}"
        )
    if choice != "auto":
        return choice
    flash = is_flash_attn_2_available() and config.optim.bf16 and not packed
    return "flash_attention_2" if flash else PER_SAMPLE_SDPA


def _load_conversations(path: Path, image_folder: str | None) -> Sequence[Conversation]:
    """A LLaVA .json / .jsonl file's records, or Parquet shards' (a .parquet file or folder), read row by row."""
    if is_shards(path):
        return ConversationShards(path, image_folder)
    return load_conversations(path, image_folder)


def build_dataset(config: TrainConfig, processor: RiceMllmProcessor) -> Dataset:
    """All records of `data.train_files` in order; generates the tiny world first when `data.tiny_world` is set.

    Raises:
        ValueError: no train file is configured.
    """
    d = config.data
    prepare_tiny_world(config)
    if not d.train_files:
        raise ValueError("data.train_files is empty: name LLaVA .json/.jsonl files or Parquet shards")
    parts = []
    for file in d.train_files:
        conversations = _load_conversations(Path(file), d.image_folder)
        logger.info("%s: %d records", file, len(conversations))
        parts.append(ConversationDataset(conversations, processor))
    return ConcatDataset(parts)


def build_collator(config: TrainConfig, processor: RiceMllmProcessor) -> Callable[[list], dict]:
    """Right-padding collator with the tokenizer's pad id (the processor batch contract), or, with
    `data.pack_max_tokens`, padding-free packing of the same samples (same per-token loss, fewer positions)."""
    if config.data.pack_max_tokens:
        return PackingCollator(config.data.pack_max_tokens, processor.pad_token_id)
    return PaddingCollator(processor.pad_token_id)


@dataclass(frozen=True)
class Builders:
    """The four integration points, injectable so stage 0 and tests run the same loop.

    `inputs` builds what the model, dataset and collator are built from: the processor here, stage 0's RegionInputs.
    Inputs with `save_pretrained` (contract.SavedWithModel) are saved in every checkpoint's model folder.
    """

    inputs: Callable[[TrainConfig], Any] = run_processor
    model: Callable[[TrainConfig, Any], nn.Module] = build_model
    dataset: Callable[[TrainConfig, Any], Dataset] = build_dataset
    collator: Callable[[TrainConfig, Any], Callable] = build_collator


DEFAULT_BUILDERS = Builders()
