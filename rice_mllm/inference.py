"""Load a kit checkpoint for inference and answer one conversation: the code path chat and eval share.

One renderer (the processor's ChatML) and one generate call, so chat, eval and training see the same text.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image

from .data.collate import PaddingCollator
from .mllm.modeling import RiceMllmForConditionalGeneration
from .mllm.processing import RiceMllmProcessor

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    """'auto' takes CUDA, then Apple MPS, then the CPU; a named device that is absent raises."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
    if name == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("--device mps asked for, but torch sees no MPS device")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto': bfloat16 on CUDA, float32 elsewhere (CPU half precision is slow and lossy)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose auto or one of {sorted(DTYPES)}")
    return DTYPES[name]


def load_for_inference(
    checkpoint: str | Path, device: str = "auto", dtype: str = "auto", load_4bit: bool = False
) -> tuple[RiceMllmForConditionalGeneration, RiceMllmProcessor]:
    """Model (eval mode, on `device`) and processor of a kit checkpoint directory.

    Args:
        checkpoint: directory written by training, merge or import.
        device, dtype: see `pick_device` / `pick_dtype`.
        load_4bit: quantise the LLM's linear layers to 4-bit NF4 with bitsandbytes; the vision tower, projector and
            LM head stay in `dtype`, where quantisation would cost the most accuracy for the least memory.
    """
    target = pick_device(device)
    torch_dtype = pick_dtype(dtype, target)
    kwargs = {"dtype": torch_dtype}
    if load_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch_dtype,
            llm_int8_skip_modules=["vision_tower", "projector", "lm_head"],
        )
        kwargs["device_map"] = {"": target}
    model = RiceMllmForConditionalGeneration.from_pretrained(checkpoint, **kwargs)
    if not load_4bit:
        model = model.to(target)
    processor = RiceMllmProcessor.from_pretrained(checkpoint)
    return model.eval(), processor


def prepare_inputs(
    processor: RiceMllmProcessor,
    messages: Sequence[Mapping[str, str]],
    images: Sequence[Image.Image],
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """A batch of one, rendered with an open assistant turn, on the model's device."""
    sample = processor(messages, images, add_generation_prompt=True)
    batch = PaddingCollator(processor.pad_token_id)([sample])
    batch.pop("labels")
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    return {key: value.to(device) for key, value in batch.items()}


def generation_settings(processor: RiceMllmProcessor, max_new_tokens: int, temperature: float, top_p: float) -> dict:
    """Greedy at temperature 0, nucleus sampling otherwise; stop at `<|im_end|>` like Qwen2.5-Instruct."""
    settings = {
        "max_new_tokens": max_new_tokens,
        "eos_token_id": processor.tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": processor.pad_token_id,
        "do_sample": temperature > 0,
    }
    if temperature > 0:
        settings.update(temperature=temperature, top_p=top_p)
    return settings


def answer(
    model: RiceMllmForConditionalGeneration,
    processor: RiceMllmProcessor,
    messages: Sequence[Mapping[str, str]],
    images: Sequence[Image.Image] = (),
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    streamer=None,
) -> str:
    """The assistant's reply to `messages` (whose `<image>` placeholders match `images`)."""
    inputs = prepare_inputs(processor, messages, images, model.device, model.vision_tower.dtype)
    settings = generation_settings(processor, max_new_tokens, temperature, top_p)
    tokens = model.generate(**inputs, streamer=streamer, **settings)
    return processor.tokenizer.decode(tokens[0], skip_special_tokens=True).strip()
