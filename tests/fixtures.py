"""Shared test fixtures: tiny configurations, tiny kit checkpoints for inference, and a toy model for the trainer.

- `tiny_mllm_config`: the kit's multimodal config at the sizes of transformers' own testers (fast on two cores).
- `save_tiny_kit`, `reference_reply`: a random kit checkpoint with the tiny tokenizer, and an independent greedy
  reply to compare chat and eval against.
- `ToyMllm`, `toy_builders`: a real, tiny multimodal-shaped model built from transformers parts (MLCD + Qwen2),
  with the kit model's part names and batch contract, so trainer tests run in seconds.
  `python -m tests.fixtures a.b=value ...` runs the trainer CLI on it (TOY_DELAY: seconds per sample, TOY_SAMPLES).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import (
    MLCDVisionConfig,
    MLCDVisionModel,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from rice_mllm.checkpoint_layout import resolve_model_dir
from rice_mllm.mllm.assembly import TINY_TOKENIZER, build_processor
from rice_mllm.mllm.configuration import RiceMllmConfig
from rice_mllm.mllm.modeling import RiceMllmForConditionalGeneration
from rice_mllm.presets import load_preset
from rice_mllm.train.builders import Builders
from rice_mllm.train.trainer import cli

REPO_ROOT = Path(__file__).resolve().parents[1]


# --- tiny configurations ---

TINY_IMAGE_TOKEN_ID = 5
TINY_TEXT = dict(
    model_type="qwen2",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=100,
    tie_word_embeddings=True,
)


def tiny_mllm_config(**overrides) -> RiceMllmConfig:
    """RICE-ViT tiny preset (3 layers, so layer -2 differs from the last) + a 2-layer Qwen2 over a 100-token vocab."""
    vision = dict(load_preset("rice-vit-tiny"), num_hidden_layers=3, image_size=28)
    fields = dict(vision_config=vision, text_config=dict(TINY_TEXT), image_token_id=TINY_IMAGE_TOKEN_ID)
    return RiceMllmConfig(**{**fields, **overrides})


# --- tiny kit checkpoints for inference tests ---


def save_tiny_kit(directory: Path, text_hidden: int = 32, seed: int = 0) -> Path:
    """A random tiny model with the tiny tokenizer, saved as a kit checkpoint (model + processor) in `directory`.

    Weight matrices are redrawn from N(0, 0.3): at the default init (std 0.02) the logits are nearly flat and
    greedy decoding repeats one token whatever the prompt, so no test could tell two conversations apart.
    """
    processor = build_processor(TINY_TOKENIZER, tile_size=28)
    config = tiny_mllm_config(image_token_id=processor.image_token_id)
    config.text_config.vocab_size = len(processor.tokenizer)
    config.text_config.hidden_size = text_hidden
    config.text_config.intermediate_size = 2 * text_hidden
    torch.manual_seed(seed)
    model = RiceMllmForConditionalGeneration(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0, 0.3)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def noise_image(height: int, width: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def reference_reply(model, processor, messages, images, max_new_tokens: int) -> str:
    """Greedy reply from one unpadded sample and the model's own generate: no code of rice_mllm.inference."""
    sample = processor(messages, images, add_generation_prompt=True)
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        tokens = model.generate(
            input_ids=sample["input_ids"][None],
            attention_mask=sample["attention_mask"][None],
            pixel_values=sample["pixel_values"],
            image_sizes=sample["image_sizes"],
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    return processor.tokenizer.decode(tokens[0], skip_special_tokens=True).strip()


# --- the toy model for trainer tests ---

VOCAB = 64
TOY_IMAGE_TOKEN_ID = 63  # the toy model's image token
IMAGE = 28  # 2x2 patches of 14 px
NUM_IMAGE_TOKENS = 4


class ToyMllmConfig(PretrainedConfig):
    model_type = "toy_mllm"

    def __init__(self, vision_config: dict | None = None, text_config: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.image_token_id = TOY_IMAGE_TOKEN_ID
        self.vision_config = vision_config or dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=IMAGE,
            patch_size=14,
        )
        self.text_config = text_config or dict(
            TINY_TEXT, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=False
        )


class ToyMllm(PreTrainedModel):
    """Vision features (CLS dropped) -> projector -> placed at image tokens, newline appended to the last one."""

    config_class = ToyMllmConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    parts = RiceMllmForConditionalGeneration.parts
    _no_split_modules = []

    def __init__(self, config: ToyMllmConfig):
        super().__init__(config)
        vision = MLCDVisionConfig(**config.vision_config)
        text = Qwen2Config(**config.text_config)
        self.vision_tower = MLCDVisionModel(vision)
        self.projector = nn.Sequential()
        self.projector.add_module("linear_1", nn.Linear(vision.hidden_size, text.hidden_size))
        self.projector.add_module("act", nn.GELU())
        self.projector.add_module("linear_2", nn.Linear(text.hidden_size, text.hidden_size))
        self.image_newline = nn.Parameter(torch.randn(text.hidden_size) * 0.02)
        self.language_model = Qwen2ForCausalLM(text)
        self.post_init()

    def unused_parameter_names(self) -> list[str]:
        """The pooled-CLS norm: forward uses last_hidden_state only (the real model has the same method)."""
        return [n for n, _ in self.named_parameters() if n.startswith("vision_tower.post_layernorm.")]

    def sharded_parameter_names(self) -> list[str]:
        return []

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def forward(self, input_ids, attention_mask=None, labels=None, pixel_values=None, image_sizes=None, **kwargs):
        embeds = self.language_model.get_input_embeddings()(input_ids)  # [B, T, D]
        if pixel_values is not None:
            feats = self.vision_tower(pixel_values).last_hidden_state[:, 1:]  # [I, 4, Dv]
            feats = self.projector(feats)  # [I, 4, D]
            # the newline is added to each image's last token so it receives a gradient through the LLM loss
            feats = torch.cat([feats[:, :-1], feats[:, -1:] + self.image_newline], dim=1)
            mask = (input_ids == TOY_IMAGE_TOKEN_ID).unsqueeze(-1).expand_as(embeds)
            embeds = embeds.masked_scatter(mask, feats.reshape(-1).to(embeds.dtype))
        out = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)
        return CausalLMOutputWithPast(loss=out.loss, logits=out.logits)


class ToyDataset(torch.utils.data.Dataset):
    """Deterministic samples: an image (4 image tokens) followed by text whose labels follow a fixed rule."""

    def __init__(self, n: int = 32, length: int = 12, seed: int = 0, delay: float = 0.0):
        self.delay = delay  # seconds per sample: lets a test kill a run mid-way
        g = torch.Generator().manual_seed(seed)
        self.pixels = torch.randn(n, 3, IMAGE, IMAGE, generator=g)
        text = torch.randint(0, TOY_IMAGE_TOKEN_ID, (n, length - NUM_IMAGE_TOKENS), generator=g)
        self.ids = torch.cat([torch.full((n, NUM_IMAGE_TOKENS), TOY_IMAGE_TOKEN_ID), text], dim=1)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        time.sleep(self.delay)
        labels = self.ids[i].clone()
        labels[:NUM_IMAGE_TOKENS] = -100
        return {"input_ids": self.ids[i], "labels": labels, "pixel_values": self.pixels[i : i + 1]}


def collate(samples: list[dict]) -> dict:
    ids = torch.stack([s["input_ids"] for s in samples])
    return {
        "input_ids": ids,
        "labels": torch.stack([s["labels"] for s in samples]),
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.cat([s["pixel_values"] for s in samples]),
        "image_sizes": torch.tensor([[IMAGE, IMAGE]] * len(samples)),
    }


def build_toy_model(config, processor=None) -> ToyMllm:
    if config.model.init_from:
        return ToyMllm.from_pretrained(resolve_model_dir(config.model.init_from))
    return ToyMllm(ToyMllmConfig())


def toy_builders(n: int = 32, delay: float = 0.0) -> Builders:
    return Builders(
        inputs=lambda config: None,
        model=build_toy_model,
        dataset=lambda config, processor: ToyDataset(n=n, delay=delay),
        collator=lambda config, processor: collate,
    )


if __name__ == "__main__":  # the trainer CLI on the toy model for subprocess tests (TOY_DELAY: seconds per sample)
    cli(
        sys.argv[1:],
        toy_builders(n=int(os.environ.get("TOY_SAMPLES", "32")), delay=float(os.environ.get("TOY_DELAY", "0"))),
    )
