"""Tiny kit checkpoints for inference tests (chat, eval) and an independent reference for their replies."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tiny import tiny_mllm_config

from rice_mllm.mllm.assembly import TINY_TOKENIZER, build_processor
from rice_mllm.mllm.modeling import RiceMllmForConditionalGeneration

REPO_ROOT = Path(__file__).resolve().parents[1]


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
