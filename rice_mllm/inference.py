"""Load a kit checkpoint for inference and answer conversations: the code path chat, eval and serve share.

One renderer (the processor's ChatML) and one generate call, so chat, eval, serve and training see the same text.
Invariants: a batch answers each conversation as it would be answered alone (left padding, masked); streamed text
(`ReplyDecoder`) joins up to exactly the reply `answer` returns.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import torch
from PIL import Image, UnidentifiedImageError
from transformers.generation.streamers import BaseStreamer

from .checkpoint_layout import (
    adapter_base_dir,
    attach_adapter,
    check_model_dir,
    is_adapter,
    resolve_model_dir,
)
from .constants import IMAGE_TOKEN, REGION_FEATURE_TOKEN
from .data.collate import PaddingCollator
from .mllm.boxes import BOX_END, BOX_START
from .mllm.chat_template import IM_END, IM_START
from .mllm.modeling import RiceMllmForConditionalGeneration
from .mllm.processing import RiceMllmProcessor

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Kept out of 4-bit: the vision side is small and its errors compound through every image token; the LM head is
# one layer whose quantisation error lands directly on the logits.
SKIP_4BIT = ["vision_tower", "projector", "lm_head"]
# bitsandbytes' CPU 4-bit kernel (0.50) packs weights in blocks of 64 inputs and 32 outputs; other shapes crash
# inside its forward with a bare reshape error, so they are refused at load time with the layer's name.
CPU_4BIT_BLOCK = (32, 64)
MAX_IMAGE_PIXELS = 64_000_000  # beyond this a decompression bomb is likelier than a photo
# Text a user turn cannot carry: the template would read it as an image placeholder or a turn boundary.
TEMPLATE_MARKERS = (IMAGE_TOKEN, REGION_FEATURE_TOKEN, IM_START, IM_END)
# Special tokens a reply keeps: Qwen2.5's tokenizer marks its box tokens special, and eval and chat read boxes in text.
KEPT_SPECIAL_TOKENS = (BOX_START, BOX_END)


class ImageReadError(ValueError):
    """An image that cannot be used: not decodable, or over the pixel limit (the message says which)."""


def read_image(source: str | Path | BinaryIO, name: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image fully as RGB, or raise ImageReadError naming `name` and why.

    The size is read from the header before any pixel is decoded, so a decompression bomb costs no memory.
    """
    try:
        with Image.open(source) as handle:
            if handle.width * handle.height > max_pixels:
                raise ImageReadError(f"{name} is {handle.width}x{handle.height}: over {max_pixels:,} pixels")
            return handle.convert("RGB")
    except ImageReadError:
        raise
    except UnidentifiedImageError:  # its message names the file object, an address when it is in memory
        raise ImageReadError(f"cannot read {name} as an image: not a known image format") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageReadError(f"cannot read {name} as an image: {error}") from None


def template_marker_in(text: str) -> str | None:
    """The first template marker (`<image>`, `<|im_start|>`, `<|im_end|>`) that `text` contains, else None."""
    return next((marker for marker in TEMPLATE_MARKERS if marker in text), None)


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


def quiet_transformers() -> None:
    """For command-line runs only: hide transformers' loading progress bars and advisory warnings (errors stay).

    It changes transformers' global logging, so CLI modules call it under `__main__`, never from `main`."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _load_model(checkpoint: Path, load_4bit: bool, **kwargs) -> RiceMllmForConditionalGeneration:
    """A full checkpoint as is; a LoRA one over the base it names, merged (unless 4-bit: NF4 weights cannot
    absorb the adapter, so it stays attached)."""
    if not is_adapter(checkpoint):
        return RiceMllmForConditionalGeneration.from_pretrained(checkpoint, **kwargs)
    base = RiceMllmForConditionalGeneration.from_pretrained(adapter_base_dir(checkpoint), **kwargs)
    adapted = attach_adapter(base, checkpoint)
    return adapted.get_base_model() if load_4bit else adapted.merge_and_unload()


def _check_cpu_4bit_shapes(model: RiceMllmForConditionalGeneration) -> None:
    import bitsandbytes as bnb

    block_out, block_in = CPU_4BIT_BLOCK
    bad = [
        f"{name} ({module.out_features}x{module.in_features})"
        for name, module in model.named_modules()
        if isinstance(module, bnb.nn.Linear4bit) and (module.in_features % block_in or module.out_features % block_out)
    ]
    if bad:
        raise ValueError(
            f"bitsandbytes' CPU 4-bit kernel needs linear layers of multiples of {block_out} outputs x {block_in} "
            f"inputs; these are not: {', '.join(bad[:6])}{' ...' if len(bad) > 6 else ''}. Drop --load-4bit on CPU"
        )


def load_for_inference(
    checkpoint: str | Path, device: str = "auto", dtype: str = "auto", load_4bit: bool = False
) -> tuple[RiceMllmForConditionalGeneration, RiceMllmProcessor]:
    """Model (eval mode, on `device`) and processor of a kit checkpoint directory.

    Args:
        checkpoint: directory written by training, merge or import (model and processor side by side; a run or
            checkpoint folder stands for its last model), or a LoRA
            checkpoint, loaded over the base model it records and merged.
        device, dtype: see `pick_device` / `pick_dtype`.
        load_4bit: quantise the LLM's decoder linear layers to 4-bit NF4 with bitsandbytes while loading; the
            vision tower, projector, `image_newline` and LM head stay in `dtype` (see SKIP_4BIT).

    Raises:
        CheckpointFormatError: not a kit checkpoint (missing folder or configs, damaged weights, LoRA adapter
            without its base, model and processor geometries that disagree).
        CheckpointMismatchError: the weights do not match the config (names the keys).
    """
    checkpoint = resolve_model_dir(checkpoint)
    check_model_dir(checkpoint)
    target = pick_device(device)
    torch_dtype = pick_dtype(dtype, target)
    kwargs: dict = {"dtype": torch_dtype}
    if load_4bit:
        from transformers import BitsAndBytesConfig

        # transformers' bnb quantiser swaps every nn.Linear not under a skipped module name for Linear4bit while
        # loading; the kit's model needs nothing special for it (checked on CPU with bitsandbytes 0.50).
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch_dtype,
            llm_int8_skip_modules=SKIP_4BIT,
        )
        kwargs["device_map"] = {"": target}
    model = _load_model(checkpoint, load_4bit, **kwargs)
    if load_4bit and target.type == "cpu":
        _check_cpu_4bit_shapes(model)
    if not load_4bit:
        model = model.to(target)
    processor = RiceMllmProcessor.from_pretrained(checkpoint)
    return model.eval(), processor


# a prompt: messages whose `<image>` placeholders match the images
Prompt = tuple[Sequence[Mapping[str, str]], Sequence[Image.Image]]


def prepare_inputs(
    processor: RiceMllmProcessor,
    prompts: Sequence[Prompt],
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Render prompts with an open assistant turn and batch them, left-padded, on the model's device.

    Generation appends to the right end of every row, so the rows must end together: padding goes on the left
    (masked by attention_mask; transformers derives positions from the mask, so padding does not shift them).

    Returns:
        input_ids, attention_mask [B, T]; pixel_values [tiles, 3, S, S] in `dtype`; image_sizes [images, 2].
    """
    samples = [processor(messages, images, add_generation_prompt=True) for messages, images in prompts]
    return batch_samples(processor, samples, device, dtype)


def batch_samples(
    processor: RiceMllmProcessor, samples: Sequence[dict[str, torch.Tensor]], device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Left-padded batch of samples the processor rendered with `add_generation_prompt=True`; see `prepare_inputs`."""
    batch = PaddingCollator(processor.pad_token_id)(samples)
    batch.pop("labels")
    lengths = [len(sample["input_ids"]) for sample in samples]
    width = batch["input_ids"].shape[1]
    for key in ("input_ids", "attention_mask"):
        for row, length in enumerate(lengths):
            batch[key][row] = batch[key][row].roll(width - length)
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


def answer_batch(
    model: RiceMllmForConditionalGeneration,
    processor: RiceMllmProcessor,
    prompts: Sequence[Prompt],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    **generate_kwargs,
) -> list[str]:
    """The assistant's reply to each (messages, images) pair, generated as one left-padded batch.

    Args:
        prompts: per prompt, messages whose `<image>` placeholders match its PIL images.
        generate_kwargs: passed to `generate` (e.g. `streamer` for a batch of one, `stopping_criteria`).

    Returns:
        One reply per conversation, special tokens removed, surrounding whitespace stripped.
    """
    if not prompts:
        return []
    inputs = prepare_inputs(processor, prompts, model.device, model.vision_tower.dtype)
    settings = generation_settings(processor, max_new_tokens, temperature, top_p)
    tokens = model.generate(**inputs, **settings, **generate_kwargs)  # [B, new_tokens]
    eos = settings["eos_token_id"]
    replies = []
    for row in tokens.tolist():
        # Rows that finished early are filled with padding after their <|im_end|>: cut there.
        row = row[: row.index(eos)] if eos in row else row
        replies.append(decode_reply(processor.tokenizer, row))
    return replies


def decode_reply(tokenizer, tokens: Sequence[int]) -> str:
    """A reply's text: special tokens removed but KEPT_SPECIAL_TOKENS, surrounding whitespace stripped."""
    added = tokenizer.added_tokens_encoder
    kept = {added[token]: token for token in KEPT_SPECIAL_TOKENS if token in added}
    pieces, start = [], 0
    for position, token in enumerate(tokens):
        if token in kept:  # the text between kept tokens decodes as before; the kept token is written as it is
            pieces += [tokenizer.decode(tokens[start:position], skip_special_tokens=True), kept[token]]
            start = position + 1
    pieces.append(tokenizer.decode(tokens[start:], skip_special_tokens=True))
    return "".join(pieces).strip()


class ReplyDecoder:
    """The tokens of one reply, as they are generated -> text pieces whose concatenation is `decode_reply(tokens)`.

    Each push re-decodes every token so far and releases only the stable part: leading whitespace is dropped and a
    trailing run of whitespace or U+FFFD (an unfinished UTF-8 character) is held back until more text follows.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.released = ""

    def _release(self, text: str) -> str:
        if text.startswith(self.released) and len(text) > len(self.released):
            piece, self.released = text[len(self.released) :], text
            return piece
        return ""

    def push(self, tokens: Sequence[int]) -> str:
        """Add tokens; return the newly stable text ("" when none)."""
        self.tokens += tokens
        return self._release(decode_reply(self.tokenizer, self.tokens).rstrip("\ufffd \t\n\r\f\v"))

    def finish(self) -> str:
        """The rest of the reply, held back so far."""
        return self._release(decode_reply(self.tokenizer, self.tokens))


class ReplyStreamer(BaseStreamer):
    """Generate-side streamer for a batch of one: iterating it yields `ReplyDecoder` pieces until generate ends."""

    def __init__(self, tokenizer) -> None:
        self.decoder = ReplyDecoder(tokenizer)
        self.skip_prompt = True
        self.pieces: queue.Queue[str | None] = queue.Queue()

    def put(self, value: torch.Tensor) -> None:
        if self.skip_prompt:  # generate first pushes the prompt ([1, 0] here: the model generates from embeddings)
            self.skip_prompt = False
            return
        if piece := self.decoder.push(value.reshape(-1).tolist()):
            self.pieces.put(piece)

    def end(self) -> None:
        if piece := self.decoder.finish():
            self.pieces.put(piece)
        self.pieces.put(None)

    def __iter__(self):
        while (piece := self.pieces.get()) is not None:
            yield piece


def answer(
    model: RiceMllmForConditionalGeneration,
    processor: RiceMllmProcessor,
    messages: Sequence[Mapping[str, str]],
    images: Sequence[Image.Image] = (),
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    **generate_kwargs,
) -> str:
    """The assistant's reply to `messages` (whose `<image>` placeholders match `images`); see `answer_batch`."""
    return answer_batch(model, processor, [(messages, images)], max_new_tokens, temperature, top_p, **generate_kwargs)[
        0
    ]
