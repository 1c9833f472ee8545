"""Import a checkpoint trained with LLaVA-NeXT's repository (`LlavaQwenForCausalLM`: a Qwen2 LLM, an MLCD/RICE tower).

Such a `config.json` holds the LLM's fields at its top level and LLaVA's `mm_*` settings beside them; each setting
that changes the model is mapped or refused by name (`from_llava_repo_config`). Invariant: a checkpoint imports only
when the kit computes what LLaVA's repo does, up to the unpad rounding (the kit's is transformers', DESIGN.md 5).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen2Config

from ..loading import verify_checkpoint
from ..mllm.configuration import RiceMllmConfig
from ..mllm.grid_pinpoints import parse_grid_pinpoints
from ..mllm.image_processing import RiceImageProcessor
from ..mllm.modeling import RiceMllmForConditionalGeneration
from ..mllm.processing import RiceMllmProcessor, add_image_token
from ..presets import load_preset
from ..vision import RiceVisionConfig
from .tensors import read_weights, rename_keys, write_model

logger = logging.getLogger(__name__)

# LLaVA repo prefix -> kit prefix (the longest matching prefix wins). `mm_projector` is an nn.Sequential of
# Linear, GELU, Linear; the tower is LLaVA's wrapper around the HF vision model, hence `vision_tower.vision_tower`.
LLAVA_REPO_TO_KIT = {
    "model.vision_tower.vision_tower.vision_model.": "vision_tower.vision_model.",
    "model.mm_projector.0.": "projector.linear_1.",
    "model.mm_projector.2.": "projector.linear_2.",
    "model.image_newline": "image_newline",
    "model.": "language_model.model.",
    "lm_head.": "language_model.lm_head.",
}
# `mm_vision_tower` values known offline: the released towers whose configs the kit ships as presets.
KNOWN_TOWERS = {
    "DeepGlint-AI/rice-vit-large-patch14-560": "rice-vit-l14-560",
    "DeepGlint-AI/mlcd-vit-large-patch14-336": "rice-vit-l14-336",
}
MODEL_TYPES = ("llava_qwen",)  # LLaVA-NeXT's LlavaQwenConfig; llava_llama, llava_mistral, llava_qwen_moe: other LLMs


class LlavaRepoConfigError(ValueError):
    """A LLaVA-repo setting the kit does not reproduce (the message names the field, its value and what works)."""


def _refuse(field: str, value, supported: str) -> LlavaRepoConfigError:
    return LlavaRepoConfigError(f"LLaVA config field {field}={value!r} is not supported: the kit imports {supported}")


def resolve_tower(raw: dict, vision_tower: str | Path | None = None) -> tuple[RiceVisionConfig, Path | None]:
    """The tower's config, and the folder it came from (None for a preset): `vision_tower` when given, else
    `mm_vision_tower` as a local folder, else a released tower's preset (KNOWN_TOWERS)."""
    source = vision_tower or raw.get("mm_vision_tower")
    if source is not None and (Path(source) / "config.json").is_file():
        return RiceVisionConfig.from_pretrained(source), Path(source)
    if source in KNOWN_TOWERS:
        return RiceVisionConfig(**load_preset(KNOWN_TOWERS[source])), None
    raise LlavaRepoConfigError(
        f"mm_vision_tower={source!r} is neither a folder holding the tower's config.json nor a known tower "
        f"({sorted(KNOWN_TOWERS)}): pass --vision-tower DIR (an MLCD/RICE model folder)"
    )


def from_llava_repo_config(raw: dict, vision: RiceVisionConfig, image_token_id: int) -> tuple[RiceMllmConfig, int]:
    """The kit config of a LLaVA-NeXT-repo config dict, and its max_length (`tokenizer_model_max_length`).

    Mapped: `mm_vision_select_layer` -> vision_feature_layer; `image_aspect_ratio` "anyres" / "anyres_max_N" ->
    max_grid_tiles None / N; `image_grid_pinpoints` (a list or a "(1x1),...,(6x6)" string), each pair swapped: LLaVA's
    repo reads them as (width, height), the kit as (height, width), so the same grid is chosen. Multi-image samples
    give their base tile only (the repo's "pad" for them). Refused unless LLaVA-NeXT's defaults: `mm_projector_type`
    (mlp2x_gelu), `mm_vision_select_feature` (patch: CLS dropped), `mm_patch_merge_type` (spatial_unpad: unpadded
    grid with image_newline), `mm_use_im_start_end` (false), other model types than llava_qwen.
    """
    checks = {
        "model_type": (raw.get("model_type"), MODEL_TYPES, "a Qwen2 LLM (model_type llava_qwen)"),
        "mm_projector_type": (raw.get("mm_projector_type"), ("mlp2x_gelu",), "the mlp2x_gelu projector"),
        "mm_vision_select_feature": (raw.get("mm_vision_select_feature", "patch"), ("patch",), "patch features"),
        "mm_patch_merge_type": (raw.get("mm_patch_merge_type"), ("spatial_unpad",), "spatial_unpad (unpadded grid)"),
        "mm_use_im_start_end": (raw.get("mm_use_im_start_end", False), (False,), "images without start/end tokens"),
    }
    for field, (value, allowed, supported) in checks.items():
        if value not in allowed:
            raise _refuse(field, value, supported)
    aspect = raw.get("image_aspect_ratio")
    if aspect != "anyres" and not (isinstance(aspect, str) and aspect.removeprefix("anyres_max_").isdigit()):
        raise _refuse("image_aspect_ratio", aspect, "anyres and anyres_max_N (anyres tiling)")
    grids = raw.get("image_grid_pinpoints")
    try:
        pinpoints, _ = parse_grid_pinpoints(grids, vision.image_size)
    except (TypeError, ValueError) as error:
        raise _refuse("image_grid_pinpoints", grids, f"a list of pairs or a grid string ({error})") from None
    text_fields = set(Qwen2Config().to_dict()) - {"model_type", "architectures", "dtype", "torch_dtype"}
    text = Qwen2Config(**{key: value for key, value in raw.items() if key in text_fields})
    config = RiceMllmConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=image_token_id,
        image_grid_pinpoints=[[w, h] for h, w in pinpoints],
        vision_feature_layer=int(raw.get("mm_vision_select_layer", -2)),
        projector_hidden_act="gelu",
        max_grid_tiles=None if aspect == "anyres" else int(aspect.removeprefix("anyres_max_")),
        multi_image_tiling="base",
    )
    return config, raw.get("tokenizer_model_max_length")


def _grow_vocabulary(weights: dict[str, torch.Tensor], config: RiceMllmConfig, size: int) -> None:
    """Rows for tokens the tokenizer gained (`<image>`) in the embeddings and LM head: their mean, as transformers'
    resize_token_embeddings initialises them (the image token's input row is always replaced by features)."""
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        if key in weights:
            old = weights[key]
            weights[key] = torch.cat([old, old.float().mean(0, keepdim=True).to(old.dtype).expand(size - len(old), -1)])
    config.text_config.vocab_size = size


def import_llava_repo(llava_dir: str | Path, out_dir: str | Path, vision_tower: str | Path | None = None) -> Path:
    """Write a kit checkpoint (model, tokenizer with `<image>` added, processor) from a LLaVA-NeXT-repo checkpoint.

    Args:
        llava_dir: the repo's output folder: config.json, safetensors weights, the tokenizer.
        out_dir: the kit checkpoint folder to write.
        vision_tower: the tower's folder when `mm_vision_tower` names none reachable here; its weights are used
            when the checkpoint holds no `model.vision_tower.vision_tower.*` tensors.

    Raises:
        LlavaRepoConfigError: a setting the kit does not reproduce, named.
        CheckpointMismatchError: tensors missing, unexpected or mis-shaped after the rename, named.
    """
    llava_dir, out_dir = Path(llava_dir), Path(out_dir)
    if not any(llava_dir.glob("*.safetensors")):
        raise FileNotFoundError(f"{llava_dir} holds no safetensors weights (pickled .bin files are not read)")
    raw = json.loads((llava_dir / "config.json").read_text())
    vision, tower_dir = resolve_tower(raw, vision_tower)
    tokenizer = AutoTokenizer.from_pretrained(llava_dir)
    config, max_length = from_llava_repo_config(raw, vision, add_image_token(tokenizer))
    weights = rename_keys(read_weights(llava_dir), LLAVA_REPO_TO_KIT)
    if tower_dir is not None and not any(key.startswith("vision_tower.") for key in weights):
        tower = read_weights(tower_dir)  # MLCD layout, with or without the `vision_model.` prefix
        weights.update(
            {
                "vision_tower." + ("" if k.startswith("vision_model.") else "vision_model.") + k: v
                for k, v in tower.items()
            }
        )
    if config.text_config.tie_word_embeddings:
        weights.pop("language_model.lm_head.weight", None)
    if len(tokenizer) > config.text_config.vocab_size:
        _grow_vocabulary(weights, config, len(tokenizer))
    with torch.device("meta"):
        verify_checkpoint(RiceMllmForConditionalGeneration(config), {k: tuple(v.shape) for k, v in weights.items()})
    write_model(weights, config, out_dir)
    # LLaVA's repo resizes with PIL (CLIPImageProcessor and its own anyres code): the kit's "pil" gives its pixels.
    image_processor = RiceImageProcessor(config.anyres_geometry(), resample="pil")
    RiceMllmProcessor(tokenizer, image_processor, max_length).save_pretrained(out_dir)
    logger.info("imported %s -> %s (%d tensors)", llava_dir, out_dir, len(weights))
    return out_dir
