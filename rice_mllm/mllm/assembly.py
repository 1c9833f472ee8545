"""Assemble a multimodal model and its processor from parts: a RICE-ViT (preset or checkpoint), a Qwen2.5 LLM
(preset, local directory or hub id) and a tokenizer. This is how stage 1 starts; later stages load a kit checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

from ..constants import REGION_FEATURE_TOKEN
from ..presets import PRESET_DIR, list_presets, load_preset
from ..vision import RiceVisionConfig, RiceVisionModel
from .anyres import DEFAULT_MULTI_IMAGE_TILING, AnyresGeometry
from .chat_template import DEFAULT_TEMPLATE
from .configuration import RiceMllmConfig
from .grid_pinpoints import resolve_grid
from .image_processing import RiceImageProcessor
from .lm_loss import install_chunked_loss_head
from .modeling import RiceMllmForConditionalGeneration
from .processing import RiceMllmProcessor, add_image_token
from .projector import DEFAULT_PROJECTOR_TYPE, spatial_merge_size

logger = logging.getLogger(__name__)

TINY_TOKENIZER = PRESET_DIR / "tokenizers" / "tiny"


def build_processor(
    tokenizer: str | Path,
    tile_size: int,
    patch_size: int = 14,
    max_tiles: int | None = None,
    max_grid_tiles: int | None = None,
    max_length: int | None = None,
    multi_image_tiling: str = DEFAULT_MULTI_IMAGE_TILING,
    image_grid_pinpoints: str | list | None = None,
    template: str = DEFAULT_TEMPLATE,
    region_tokens: bool = False,
    projector_type: str = DEFAULT_PROJECTOR_TYPE,
) -> RiceMllmProcessor:
    """A processor over `tokenizer` (directory or hub id; `<image>` added if missing) with anyres geometry.

    Args:
        tile_size, patch_size: the vision encoder's input size and patch size.
        max_tiles: every grid of at most this many tiles (default 4, with 1x1, 1x4 and 4x1); not with
            `image_grid_pinpoints`.
        max_grid_tiles: optional token budget (OneVision `anyres_max_K`).
        max_length: samples longer than this are refused, never truncated.
        multi_image_tiling: "anyres" or "base" (images of multi-image samples give their base tile only).
        image_grid_pinpoints: the grids in any form `grid_pinpoints.parse_grid_pinpoints` reads ("llava-next",
            "(1x1),...,(3x3)", "anyres_max_9", [[height, width], ...]).
        template: "chatml" or "plain" (LLaVA's alignment template), see `chat_template.TEMPLATES`.
        region_tokens: a REGION_FEATURE_TOKEN after each box of a user turn, for a model with region tokens.
        projector_type: the model's projector, which sets how many patches one image token stands for.
    """
    loaded = AutoTokenizer.from_pretrained(str(tokenizer))
    add_image_token(loaded)
    if region_tokens:
        add_image_token(loaded, REGION_FEATURE_TOKEN)
    pinpoints, budget = resolve_grid(tile_size, image_grid_pinpoints, max_tiles, max_grid_tiles)
    geometry = AnyresGeometry(
        tile_size, patch_size, pinpoints, budget, multi_image_tiling, spatial_merge_size(projector_type)
    )
    return RiceMllmProcessor(loaded, RiceImageProcessor(geometry), max_length, template, region_tokens)


def _is_preset(name: str) -> bool:
    return name in list_presets()


def _vision_part(vision: str) -> tuple[RiceVisionConfig, RiceVisionModel | None]:
    if _is_preset(vision):
        return RiceVisionConfig(**load_preset(vision)), None
    encoder = RiceVisionModel.from_pretrained(vision)
    return encoder.config, encoder


def _text_part(llm: str):
    if _is_preset(llm):
        return Qwen2Config(**load_preset(llm)), None
    language_model = AutoModelForCausalLM.from_pretrained(llm)
    return language_model.config, language_model


def assemble_model(
    vision: str, llm: str, processor: RiceMllmProcessor, projector_type: str = DEFAULT_PROJECTOR_TYPE
) -> RiceMllmForConditionalGeneration:
    """A fresh multimodal model: pretrained parts where paths/hub ids are given, random ones for preset names.

    The projector and `image_newline` start random (stage 1 trains them). If the tokenizer grew (the `<image>` token,
    the region token), the LLM's embeddings are resized to match; the model has region tokens when the processor does.
    """
    vision_config, encoder = _vision_part(vision)
    text_config, language_model = _text_part(llm)
    geometry = processor.image_processor.geometry
    if (geometry.tile_size, geometry.patch_size) != (vision_config.image_size, vision_config.patch_size):
        raise ValueError(
            f"processor tiles are {geometry.tile_size}px/patch {geometry.patch_size} but the vision tower {vision!r} "
            f"takes {vision_config.image_size}px/patch {vision_config.patch_size}"
        )
    if spatial_merge_size(projector_type) != geometry.spatial_merge_size:
        raise ValueError(
            f"projector {projector_type!r} merges {spatial_merge_size(projector_type)} patches a side but the "
            f"processor counts tokens for {geometry.spatial_merge_size}: build it with the same projector_type"
        )
    config = RiceMllmConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_id=processor.image_token_id,
        image_grid_pinpoints=[list(p) for p in geometry.image_grid_pinpoints],
        max_grid_tiles=geometry.max_grid_tiles,
        multi_image_tiling=geometry.multi_image_tiling,
        region_token_id=processor.region_token_id,
        projector_type=projector_type,
    )
    model = RiceMllmForConditionalGeneration(config)
    if encoder is not None:
        model.vision_tower.load_state_dict(encoder.state_dict())
    if language_model is not None:
        model.language_model.load_state_dict(language_model.state_dict())
    vocab = len(processor.tokenizer)
    if vocab > config.text_config.vocab_size:
        logger.info("resizing LLM embeddings %d -> %d for the added tokens", config.text_config.vocab_size, vocab)
        model.language_model.resize_token_embeddings(vocab)
        install_chunked_loss_head(model.language_model)  # an untied head comes back a plain nn.Linear
        model.config.text_config.vocab_size = vocab
    return model
