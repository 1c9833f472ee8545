"""Kit checkpoint <-> transformers `LlavaNextForConditionalGeneration` / `LlavaOnevisionForConditionalGeneration`.

Both build the tower with `AutoModel.from_config`, so the RICE/MLCD encoder needs no remote code, and
`vision_feature_select_strategy="default"` drops CLS as the kit does. OneVision keeps LLaVA-NeXT's parameter names, so
either way the weights are a pure key rename: the kit keeps transformers' field and parameter names for this reason.
Invariant: a target is written only where transformers computes what the kit does (see `choose_target`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from transformers import (
    AutoTokenizer,
    LlavaNextConfig,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionImageProcessorPil,
)

from ..checkpoint_layout import PROCESSOR_CONFIG_FILE, full_model_dir
from ..constants import CLIP_MEAN, CLIP_STD, IMAGE_TOKEN
from ..mllm.chat_template import DEFAULT_TEMPLATE, TEMPLATES
from ..mllm.configuration import RiceMllmConfig
from ..mllm.image_processing import RiceImageProcessor
from ..mllm.processing import RiceMllmProcessor
from ..mllm.projector import DEFAULT_PROJECTOR_TYPE
from .tensors import read_weights, rename_keys, write_model

logger = logging.getLogger(__name__)

# kit prefix -> transformers LLaVA-NeXT / OneVision prefix (the longest matching prefix wins; order is irrelevant).
KIT_TO_LLAVA_NEXT = {
    "vision_tower.vision_model.": "model.vision_tower.",
    "projector.": "model.multi_modal_projector.",
    "image_newline": "model.image_newline",
    "language_model.model.": "model.language_model.",
    "language_model.lm_head.": "lm_head.",
}
TARGETS = ("llava_next", "llava_onevision")  # transformers' model_type of each
ARCHITECTURES = {
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
}
VIDEO_TOKEN = "<video>"  # OneVision's processor names one; kit models have no videos


def choose_target(config: RiceMllmConfig, target: str = "auto") -> str:
    """The transformers class to write: "auto" takes LLaVA-NeXT when the model has no token budget and tiles every
    image, else OneVision, which has both (`anyres_max_K`, and `batch_num_images` for base-tile multi-image samples).

    OneVision cuts the images of a multi-image sample to their base tile, so a budgeted model with
    `multi_image_tiling=anyres` is reproduced there on one-image and text-only samples, and on multi-image samples
    when their images are passed one list per image (batch_num_images of ones). Forcing "llava_next" on a model it
    cannot reproduce raises, naming the setting, and so does any target for a model with region tokens or with a
    projector other than mlp2x_gelu, which neither class computes.
    """
    if config.projector_type != DEFAULT_PROJECTOR_TYPE:
        raise ValueError(
            f"the model's projector is {config.projector_type!r}, which transformers' LLaVA-NeXT and OneVision "
            "classes do not compute; export a model with mlp2x_gelu"
        )
    if config.region_token_id is not None:
        raise ValueError(
            "the model has region tokens (region_token_id: box features from RICE's region transformer), which "
            "transformers' LLaVA-NeXT and OneVision classes do not compute; export a model trained without them"
        )
    if target == "auto":
        return "llava_next" if config.max_grid_tiles is None and config.multi_image_tiling == "anyres" else TARGETS[1]
    if target == "llava_next":
        to_llava_next_config(config)  # raises for what LLaVA-NeXT does not reproduce
    elif target not in TARGETS:
        raise ValueError(f"unknown export target {target!r}; choose auto or one of {list(TARGETS)}")
    return target


def _shared_fields(config: RiceMllmConfig) -> dict:
    """Fields LLaVA-NeXT and OneVision configs share, with the kit's values."""
    return {
        "vision_config": config.vision_config.to_dict(),
        "text_config": config.text_config.to_dict(),
        "image_token_index": config.image_token_id,
        "projector_hidden_act": config.projector_hidden_act,
        "vision_feature_select_strategy": "default",
        "vision_feature_layer": config.vision_feature_layer,
        "multimodal_projector_bias": True,
        "tie_word_embeddings": config.text_config.tie_word_embeddings,
        "image_grid_pinpoints": [list(p) for p in config.image_grid_pinpoints],
    }


def to_llava_next_config(config: RiceMllmConfig) -> LlavaNextConfig:
    """The transformers config of the same architecture. Raises for a token budget or base-tile multi-image samples,
    which LLaVA-NeXT does not have (OneVision does)."""
    if config.max_grid_tiles is not None:
        raise ValueError(
            f"max_grid_tiles={config.max_grid_tiles}: LLaVA-NeXT has no token budget; export to llava_onevision"
        )
    if config.multi_image_tiling != "anyres":
        raise ValueError(
            f"multi_image_tiling={config.multi_image_tiling!r}: transformers' LLaVA-NeXT tiles every image of a "
            "multi-image sample, so it would not see them as this model was trained to; export to llava_onevision"
        )
    tiles = config.vision_config.image_size // config.vision_config.patch_size
    return LlavaNextConfig(**_shared_fields(config), image_seq_length=tiles * tiles)


def _max_grid(pinpoints, tile_size: int) -> int:
    return max((h // tile_size) * (w // tile_size) for h, w in pinpoints)


def onevision_budget(config: RiceMllmConfig) -> int:
    """K of OneVision's `anyres_max_K`: the model's budget, or for none the largest grid, which never shrinks: the
    unpadded grid holds at most K tiles' features, so OneVision's ratio sqrt(features / (K N^2)) stays <= 1."""
    return config.max_grid_tiles or _max_grid(config.image_grid_pinpoints, config.vision_config.image_size)


def to_llava_onevision_config(config: RiceMllmConfig) -> LlavaOnevisionConfig:
    """The transformers OneVision config of the same architecture (any budget, any multi-image tiling)."""
    return LlavaOnevisionConfig(**_shared_fields(config), vision_aspect_ratio=f"anyres_max_{onevision_budget(config)}")


def from_transformers_config(config: LlavaNextConfig | LlavaOnevisionConfig) -> RiceMllmConfig:
    """The kit config of a LLaVA-NeXT or OneVision config with an MLCD tower and a Qwen2 LLM; other towers raise.

    From OneVision: base-tile multi-image samples, and `anyres_max_K` as the budget, except a K at least the largest
    grid, which never bites (what the kit writes for a model without one), read back as none.
    """
    if config.vision_config.model_type != "mlcd_vision_model" or config.vision_feature_select_strategy != "default":
        raise ValueError(
            f"only MLCD/RICE towers with vision_feature_select_strategy='default' import; got "
            f"{config.vision_config.model_type!r} / {config.vision_feature_select_strategy!r}"
        )
    geometry = {}
    if config.model_type == "llava_onevision":
        budget = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))
        never_bites = budget >= _max_grid(config.image_grid_pinpoints, config.vision_config.image_size)
        geometry = {"max_grid_tiles": None if never_bites else budget, "multi_image_tiling": "base"}
    return RiceMllmConfig(
        vision_config=config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        image_token_id=config.image_token_index,
        image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
        vision_feature_layer=config.vision_feature_layer,
        projector_hidden_act=config.projector_hidden_act,
        **geometry,
    )


def to_llava_next_processor(processor: RiceMllmProcessor) -> LlavaNextProcessor:
    """transformers' processor for the same tiling, normalisation, image-token count and chat template.

    transformers resizes with PIL: pixels equal the kit's with `resample="pil"` and differ by a grey level or two
    with the kit's faster default torch resize.
    """
    geometry = processor.image_processor.geometry
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": geometry.tile_size},
        crop_size={"height": geometry.tile_size, "width": geometry.tile_size},
        image_grid_pinpoints=[list(p) for p in geometry.image_grid_pinpoints],
        image_mean=list(processor.image_processor.image_mean),
        image_std=list(processor.image_processor.image_std),
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=processor.tokenizer,
        patch_size=geometry.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, which "default" then drops
        image_token=IMAGE_TOKEN,
        chat_template=processor.tokenizer.chat_template,
    )


def save_llava_onevision_processor(processor: RiceMllmProcessor, budget: int, out_dir: Path) -> None:
    """Write what `LlavaOnevisionProcessor.from_pretrained` reads: the tokenizer (with the chat template) and
    processor_config.json (its image processor nested, the image-token count, `anyres_max_K`).

    The processor is written as files because transformers cannot build one without torchvision (its video
    processor); with no video processor saved, transformers derives one from the image processor's settings.
    """
    geometry = processor.image_processor.geometry
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": geometry.tile_size, "width": geometry.tile_size},
        image_grid_pinpoints=[list(p) for p in geometry.image_grid_pinpoints],
        image_mean=list(processor.image_processor.image_mean),
        image_std=list(processor.image_processor.image_std),
    )
    config = {
        "image_processor": image_processor.to_dict(),
        # Features of one tile as the tower returns them, CLS included: "default" drops one from each image's count.
        "num_image_tokens": geometry.tile_features**2 + 1,
        "vision_feature_select_strategy": "default",
        "vision_aspect_ratio": f"anyres_max_{budget}",
        "image_token": IMAGE_TOKEN,
        "video_token": VIDEO_TOKEN,
        "processor_class": "LlavaOnevisionProcessor",
    }
    processor.tokenizer.save_pretrained(out_dir)  # with chat_template.jinja
    (out_dir / "processor_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, target: str = "auto") -> Path:
    """Write a transformers LLaVA-NeXT or OneVision directory (weights, config, and the processor when the checkpoint
    has one); `checkpoint_dir` may be a model, checkpoint or run folder; `target` as in `choose_target`."""
    checkpoint_dir, out_dir = full_model_dir(checkpoint_dir, "--checkpoint"), Path(out_dir)
    config = RiceMllmConfig.from_pretrained(checkpoint_dir)
    target = choose_target(config, target)
    hf_config = to_llava_next_config(config) if target == "llava_next" else to_llava_onevision_config(config)
    hf_config.architectures = [ARCHITECTURES[target]]  # what serving stacks (vLLM, SGLang) dispatch on
    weights = rename_keys(read_weights(checkpoint_dir), KIT_TO_LLAVA_NEXT)
    if hf_config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    write_model(weights, hf_config, out_dir)
    if (checkpoint_dir / PROCESSOR_CONFIG_FILE).is_file():
        processor = RiceMllmProcessor.from_pretrained(checkpoint_dir)
        if target == "llava_next":
            to_llava_next_processor(processor).save_pretrained(out_dir)
        else:
            save_llava_onevision_processor(processor, onevision_budget(config), out_dir)
    logger.info("exported %s -> %s as %s (%d tensors)", checkpoint_dir, out_dir, target, len(weights))
    return out_dir


def _imported_processor(transformers_dir: Path, config: RiceMllmConfig) -> RiceMllmProcessor:
    """The kit processor of an exported directory: its tokenizer, geometry, normalisation and template (the kit's
    template whose Jinja twin the tokenizer carries; ChatML for any other)."""
    saved = json.loads((transformers_dir / "processor_config.json").read_text()).get("image_processor", {})
    mean, std = saved.get("image_mean", CLIP_MEAN), saved.get("image_std", CLIP_STD)
    image_processor = RiceImageProcessor(config.anyres_geometry(), mean, std)
    tokenizer = AutoTokenizer.from_pretrained(transformers_dir)
    templates = {template.jinja: name for name, template in TEMPLATES.items()}
    return RiceMllmProcessor(
        tokenizer, image_processor, template=templates.get(tokenizer.chat_template, DEFAULT_TEMPLATE)
    )


def import_checkpoint(transformers_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a kit checkpoint from a transformers LLaVA-NeXT or OneVision directory with an MLCD tower."""
    transformers_dir, out_dir = Path(transformers_dir), Path(out_dir)
    model_type = json.loads((transformers_dir / "config.json").read_text()).get("model_type")
    config_classes = {"llava_next": LlavaNextConfig, "llava_onevision": LlavaOnevisionConfig}
    if model_type not in config_classes:
        raise ValueError(f"{transformers_dir}: model_type {model_type!r} is not one of {sorted(config_classes)}")
    config = from_transformers_config(config_classes[model_type].from_pretrained(transformers_dir))
    reverse = {target: source for source, target in KIT_TO_LLAVA_NEXT.items()}
    weights = rename_keys(read_weights(transformers_dir), reverse)
    if config.text_config.tie_word_embeddings:
        weights.pop("language_model.lm_head.weight", None)
    write_model(weights, config, out_dir)
    if (transformers_dir / "processor_config.json").is_file():
        _imported_processor(transformers_dir, config).save_pretrained(out_dir)
    return out_dir
