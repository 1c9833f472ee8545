"""Stage-0 builders (`stage: stage0_pretrain`): region files -> cluster labels -> RicePretrainModel + RegionDataset.

The trainer loop is the same as for the other stages; only these builders differ. Invariant: labelling runs once, on
rank 0, into `output_dir/regions/` (atomically), and a resumed run reuses the labelled file instead of relabelling.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import ConcatDataset
from transformers import AutoTokenizer

from ..data.shards import is_shards
from ..presets import list_presets, load_preset
from ..pretrain.clusters import LABEL_HASH_TEACHER, label_region_file
from ..pretrain.modeling import RegionPretrainConfig, RicePretrainModel
from ..pretrain.region_data import RegionDataset, collate_regions, iter_region_records
from ..vision import RiceVisionConfig
from .builders import Builders, llm_tokenizer, prepare_tiny_world, vision_source
from .config import TrainConfig
from .engine import barrier, rank, world_size
from .sharded import check_centre_memory

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegionInputs:
    """What the stage-0 model and dataset are built from (Builders.inputs): labelled files and class counts."""

    files: list[Path]
    num_clusters: int
    vocab_size: int
    vision_config: RiceVisionConfig


def _object_values(files: list[Path], key: str) -> list:
    """Every object's `key` in region JSONL files or shards (shards: their `regions` column only, no image)."""
    return [o[key] for f in files for *_, r, _ in iter_region_records(f) for o in r.get("objects", []) if key in o]


def _label(config: TrainConfig, tokenizer: str) -> Path:
    """Label the one train file with `pretrain.teacher` into the run folder (skipped when already there)."""
    p, files = config.pretrain, config.data.train_files
    if shards := [f for f in files if is_shards(f)]:
        raise ValueError(
            f"pretrain.teacher={p.teacher!r} labels a region JSONL, got shards {shards}: label the JSONL they came "
            "from (`python -m rice_mllm.pretrain.clusters --data regions.jsonl --out labelled.jsonl ...`), write its "
            "shards (`python -m rice_mllm.pretrain.region_data to-shards --data labelled.jsonl --out shards/`) and "
            "train on them with pretrain.teacher=null"
        )
    if len(files) != 1:
        raise ValueError(
            f"pretrain.teacher={p.teacher!r} labels one region file, got data.train_files={files}: label them together "
            "with `python -m rice_mllm.pretrain.clusters` and set pretrain.teacher=null"
        )
    if p.num_clusters is None and p.teacher != LABEL_HASH_TEACHER:
        raise ValueError(f"pretrain.teacher={p.teacher!r} needs pretrain.num_clusters (K of k-means)")
    out = Path(config.output_dir) / "regions" / f"{Path(files[0]).stem}.labelled.jsonl"
    if rank() == 0 and out.is_file():
        logger.info("reusing the labelled %s (delete it to relabel)", out)
    elif rank() == 0:
        num_clusters = p.num_clusters or len(set(_object_values([Path(files[0])], "label")))
        tmp = out.with_name(out.name + ".tmp")  # a crash mid-write must not leave a file that looks labelled
        counts = label_region_file(files[0], tmp, p.teacher, num_clusters, tokenizer_dir=tokenizer)
        os.replace(tmp, out)
        logger.info("labelled %s -> %s: %s", files[0], out, counts)
    barrier()
    return out


def build_region_inputs(config: TrainConfig) -> RegionInputs:
    """Generate the tiny world (when `data.tiny_world`), label the train file (when `pretrain.teacher`), count classes.

    Raises:
        ValueError: no train file, `model.init_from` set, or a teacher without the settings it needs.
    """
    if config.model.init_from is not None:
        raise ValueError("stage0_pretrain starts from an encoder: set model.vision=<encoder dir>, not model.init_from")
    prepare_tiny_world(config)
    if not config.data.train_files:
        raise ValueError("data.train_files is empty: name region .jsonl files")
    tokenizer = llm_tokenizer(config)
    files = [_label(config, tokenizer)] if config.pretrain.teacher else [Path(f) for f in config.data.train_files]
    clusters = _object_values(files, "cluster")
    num_clusters = config.pretrain.num_clusters or max(clusters, default=-1) + 1
    if num_clusters < 1:
        raise ValueError(f"{[str(f) for f in files]}: no object carries a 'cluster' (set pretrain.teacher)")
    vision = vision_source(config)
    if vision in list_presets():
        vision_config = RiceVisionConfig(**load_preset(vision))
    else:
        vision_config = RiceVisionConfig.from_pretrained(vision)
    vocab_size = len(AutoTokenizer.from_pretrained(str(tokenizer)))
    return RegionInputs(files, num_clusters, vocab_size, vision_config)


def build_pretrain_model(config: TrainConfig, inputs: RegionInputs) -> nn.Module:
    """RicePretrainModel: a random encoder for a preset `model.vision`, else that encoder dir's weights. The class
    centres' memory per rank is printed, and checked against the device, before any is allocated."""
    head = RegionPretrainConfig.from_settings(config.pretrain, inputs.num_clusters, inputs.vocab_size)
    rows = {"object": inputs.num_clusters} | ({"OCR": inputs.vocab_size} if inputs.vocab_size else {})
    embed_dim = head.embed_dim or inputs.vision_config.hidden_size
    check_centre_memory(list(rows), list(rows.values()), embed_dim, world_size())
    vision = vision_source(config)
    if vision in list_presets():
        return RicePretrainModel(inputs.vision_config, head)
    return RicePretrainModel.from_encoder(vision, head)


class RegionFiles(ConcatDataset):
    """Region datasets of several files, one index space; `set_epoch` reaches each (new region draws per epoch)."""

    def set_epoch(self, epoch: int) -> None:
        for dataset in self.datasets:
            dataset.set_epoch(epoch)


def build_region_dataset(config: TrainConfig, inputs: RegionInputs) -> RegionFiles:
    """One RegionDataset per labelled file or shards (a .parquet file or folder) at the encoder's input size (or patch
    budget), seeded with `optim.seed`."""
    p = config.pretrain
    size = inputs.vision_config.image_size
    patch = inputs.vision_config.patch_size
    parts = [
        RegionDataset(f, size, p.num_regions, p.max_tokens, config.optim.seed, p.max_patches, patch)
        for f in inputs.files
    ]
    for f, part in zip(inputs.files, parts, strict=True):
        logger.info("%s: %d images", f, len(part))
    return RegionFiles(parts)


def build_region_collator(config: TrainConfig, inputs: RegionInputs) -> Callable[[list], dict[str, torch.Tensor]]:
    """`collate_regions`: the keys of RicePretrainModel.forward."""
    return collate_regions


STAGE0_BUILDERS = Builders(
    inputs=build_region_inputs,
    model=build_pretrain_model,
    dataset=build_region_dataset,
    collator=build_region_collator,
)
