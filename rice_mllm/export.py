"""Export a kit checkpoint to plain transformers (`LlavaNextForConditionalGeneration` with an MLCD tower) and back.

transformers builds LLaVA-NeXT's tower with `AutoModel.from_config`, so the RICE/MLCD encoder needs no remote code;
`vision_feature_select_strategy="default"` drops CLS as the kit does. The mapping is a pure key rename: the kit
keeps transformers' field and parameter names for exactly this reason.

    python -m rice_mllm.export --checkpoint runs/stage2 --out exported/   # to transformers
    python -m rice_mllm.export --from-transformers exported/ --out kit/   # and back
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, LlavaNextConfig, LlavaNextImageProcessorPil, LlavaNextProcessor

from .checkpoint_layout import WEIGHTS_FILE, full_model_dir, weight_files
from .constants import IMAGE_TOKEN
from .mllm.anyres import AnyresGeometry
from .mllm.chat_template import CHAT_TEMPLATE
from .mllm.configuration import RiceMllmConfig
from .mllm.image_processing import RiceImageProcessor
from .mllm.processing import CONFIG_NAME as PROCESSOR_CONFIG
from .mllm.processing import RiceMllmProcessor

logger = logging.getLogger(__name__)

# kit prefix -> transformers LLaVA-NeXT prefix (the longest matching prefix wins; order is irrelevant).
KIT_TO_LLAVA_NEXT = {
    "vision_tower.vision_model.": "model.vision_tower.",
    "projector.": "model.multi_modal_projector.",
    "image_newline": "model.image_newline",
    "language_model.model.": "model.language_model.",
    "language_model.lm_head.": "lm_head.",
}


def rename_keys(state_dict: dict[str, torch.Tensor], mapping: dict[str, str]) -> dict[str, torch.Tensor]:
    """Rename every key by its longest matching prefix in `mapping`; a key no prefix matches raises, named."""
    renamed = {}
    for key, tensor in state_dict.items():
        prefixes = [prefix for prefix in mapping if key.startswith(prefix)]
        if not prefixes:
            raise KeyError(f"no export mapping for tensor {key!r}; known prefixes: {sorted(mapping)}")
        prefix = max(prefixes, key=len)
        renamed[mapping[prefix] + key[len(prefix) :]] = tensor
    return renamed


def to_llava_next_config(config: RiceMllmConfig) -> LlavaNextConfig:
    """The transformers config of the same architecture. Raises for a token budget or base-tile multi-image samples
    (OneVision-only today)."""
    if config.max_grid_tiles is not None:
        raise ValueError(
            f"max_grid_tiles={config.max_grid_tiles}: LLaVA-NeXT has no token budget; export a model with "
            "max_grid_tiles=None (a LLaVA-OneVision target for budgeted models is not written yet)"
        )
    if config.multi_image_tiling != "anyres":
        raise ValueError(
            f"multi_image_tiling={config.multi_image_tiling!r}: transformers' LLaVA-NeXT tiles every image of a "
            "multi-image sample, so it would not see them as this model was trained to (a LLaVA-OneVision target, "
            "which does the same, is not written yet)"
        )
    tiles = config.vision_config.image_size // config.vision_config.patch_size
    return LlavaNextConfig(
        vision_config=config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        image_token_index=config.image_token_id,
        projector_hidden_act=config.projector_hidden_act,
        vision_feature_select_strategy="default",
        vision_feature_layer=config.vision_feature_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=config.text_config.tie_word_embeddings,
        image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
        image_seq_length=tiles * tiles,
    )


def from_llava_next_config(config: LlavaNextConfig) -> RiceMllmConfig:
    """The kit config of a LLaVA-NeXT config with an MLCD tower and a Qwen2 LLM; other towers raise."""
    if config.vision_config.model_type != "mlcd_vision_model" or config.vision_feature_select_strategy != "default":
        raise ValueError(
            f"only MLCD/RICE towers with vision_feature_select_strategy='default' import; got "
            f"{config.vision_config.model_type!r} / {config.vision_feature_select_strategy!r}"
        )
    return RiceMllmConfig(
        vision_config=config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        image_token_id=config.image_token_index,
        image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
        vision_feature_layer=config.vision_feature_layer,
        projector_hidden_act=config.projector_hidden_act,
    )


def _write(state_dict: dict[str, torch.Tensor], config, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors that share memory (tied embeddings): store contiguous copies.
    tensors = {key: tensor.contiguous().clone() for key, tensor in state_dict.items()}
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    config.save_pretrained(out_dir)


def _read_weights(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for file in weight_files(checkpoint_dir):
        weights.update(load_file(str(file)))
    return weights


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a transformers LLaVA-NeXT directory (weights, config, and the processor when the checkpoint has one);
    `checkpoint_dir` may be a model, checkpoint or run folder."""
    checkpoint_dir, out_dir = full_model_dir(checkpoint_dir, "--checkpoint"), Path(out_dir)
    config = RiceMllmConfig.from_pretrained(checkpoint_dir)
    llava_config = to_llava_next_config(config)
    weights = rename_keys(_read_weights(checkpoint_dir), KIT_TO_LLAVA_NEXT)
    if llava_config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    _write(weights, llava_config, out_dir)
    if (checkpoint_dir / PROCESSOR_CONFIG).is_file():
        to_llava_next_processor(RiceMllmProcessor.from_pretrained(checkpoint_dir)).save_pretrained(out_dir)
    logger.info("exported %s -> %s (%d tensors)", checkpoint_dir, out_dir, len(weights))
    return out_dir


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
        chat_template=CHAT_TEMPLATE,
    )


def import_checkpoint(transformers_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a kit checkpoint from a transformers LLaVA-NeXT directory with an MLCD tower."""
    transformers_dir, out_dir = Path(transformers_dir), Path(out_dir)
    config = from_llava_next_config(LlavaNextConfig.from_pretrained(transformers_dir))
    reverse = {target: source for source, target in KIT_TO_LLAVA_NEXT.items()}
    weights = rename_keys(_read_weights(transformers_dir), reverse)
    if config.text_config.tie_word_embeddings:
        weights.pop("language_model.lm_head.weight", None)
    _write(weights, config, out_dir)
    if (transformers_dir / "tokenizer_config.json").is_file():
        vision = config.vision_config
        geometry = AnyresGeometry(vision.image_size, vision.patch_size, config.image_grid_pinpoints)
        tokenizer = AutoTokenizer.from_pretrained(transformers_dir)
        RiceMllmProcessor(tokenizer, RiceImageProcessor(geometry)).save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rice_mllm.export", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="kit checkpoint directory to export to transformers")
    source.add_argument("--from-transformers", help="transformers LLaVA-NeXT directory to import into the kit")
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.checkpoint:
        out = export_checkpoint(args.checkpoint, args.out)
    else:
        out = import_checkpoint(args.from_transformers, args.out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
