"""Shared set-up of the kit-vs-transformers benchmarks: a CPU-sized model, its LLaVA-NeXT export, synthetic chats.

Both sides always get the same weights (the peer loads the kit's `rice_mllm.export` output) and the same samples.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import LlavaNextForConditionalGeneration

from rice_mllm.export import export_checkpoint
from rice_mllm.mllm.anyres import AnyresGeometry, num_tiles
from rice_mllm.mllm.assembly import TINY_TOKENIZER, build_processor
from rice_mllm.mllm.configuration import RiceMllmConfig
from rice_mllm.mllm.modeling import RiceMllmForConditionalGeneration
from rice_mllm.mllm.processing import RiceMllmProcessor
from rice_mllm.presets import load_preset

# CPU-sized stand-ins for rice-vit-l14-336 + Qwen2.5-0.5B with their proportions (head dim 64, 2 KV heads, MLP 5.5x
# wide: the share of attention in a step, which packing does not shrink on CPU, is then realistic), scaled down so
# a step takes about a second on 2 cores. vision: (hidden, intermediate, layers, heads); llm: + KV heads.
# Tile 112 px / patch 14 gives 64 tokens per tile (576 at 336 px).
SIZES = {
    "default": dict(tile=112, vision=(128, 512, 4, 2), llm=(256, 1408, 2, 4, 2)),
    # Wider and shallower: attention is then a smaller share of a step, as in 7B models (see BENCHMARKS.md).
    "wide": dict(tile=112, vision=(128, 512, 4, 2), llm=(512, 2816, 1, 8, 2)),
    "quick": dict(tile=56, vision=(32, 64, 3, 4), llm=(64, 128, 2, 4, 2)),
}
WORDS = "the a red blue green circle square star word left right top of and is with near big small two three".split()


def build_kit(size: str, seed: int = 0) -> tuple[RiceMllmForConditionalGeneration, RiceMllmProcessor]:
    """A random-weight kit model of `SIZES[size]` and a processor over the shipped tiny tokenizer."""
    spec = SIZES[size]
    processor = build_processor(TINY_TOKENIZER, tile_size=spec["tile"])
    hidden, intermediate, layers, heads = spec["vision"]
    vision = dict(
        load_preset("rice-vit-tiny"),
        image_size=spec["tile"],
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
    )
    hidden, intermediate, layers, heads, kv_heads = spec["llm"]
    text = dict(
        load_preset("qwen2.5-tiny"),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=len(processor.tokenizer),
    )
    config = RiceMllmConfig(vision_config=vision, text_config=text, image_token_id=processor.image_token_id)
    torch.manual_seed(seed)
    return RiceMllmForConditionalGeneration(config), processor


def export_peer(
    model: RiceMllmForConditionalGeneration, processor: RiceMllmProcessor, directory: Path
) -> LlavaNextForConditionalGeneration:
    """Save the kit model, export it with `rice_mllm.export`, and load transformers' LLaVA-NeXT from the export."""
    model.save_pretrained(directory / "kit")
    processor.save_pretrained(directory / "kit")
    export_checkpoint(directory / "kit", directory / "hf")
    return LlavaNextForConditionalGeneration.from_pretrained(directory / "hf")


def to_llava_next_pixels(batch: dict[str, torch.Tensor], geometry: AnyresGeometry) -> dict[str, torch.Tensor]:
    """The same batch in LlavaNextProcessor's layout: pixel_values [images, max tiles, 3, S, S], zero-padded; no
    batch_num_images (LLaVA-NeXT tiles every image, as `geometry` must)."""
    batch = {key: value for key, value in batch.items() if key != "batch_num_images"}
    sizes = [tuple(size) for size in batch["image_sizes"].tolist()]
    per_image = batch["pixel_values"].split([num_tiles(size, geometry) for size in sizes])
    most = max((len(tiles) for tiles in per_image), default=0)
    pixels = torch.zeros(len(sizes), most, *batch["pixel_values"].shape[1:])
    for index, tiles in enumerate(per_image):
        pixels[index, : len(tiles)] = tiles
    return dict(batch, pixel_values=pixels) if sizes else {k: v for k, v in batch.items() if "pixel" not in k}


def make_chats(count: int, seed: int, max_side: int = 800) -> list[tuple[list[dict], list[Image.Image]]]:
    """Instruction-tuning-like samples with long-tailed lengths, as LLaVA-NeXT's mixture has: 25% text-only
    (several turns), 60% one image, 15% two images; images 100..max_side px a side; answers 2..150 words."""
    rng = np.random.default_rng(seed)
    chats = []
    for _ in range(count):
        num_images = int(rng.choice([0, 1, 2], p=[0.25, 0.6, 0.15]))
        turns = int(rng.integers(1, 7 if num_images == 0 else 4))
        messages = []
        for turn in range(turns):
            question = " ".join(rng.choice(WORDS, size=int(rng.integers(4, 20))))
            if turn == 0 and num_images:
                question = "<image>\n" * num_images + question
            answer = " ".join(rng.choice(WORDS, size=int(np.exp(rng.uniform(np.log(2), np.log(150))))))
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        images = []
        for _ in range(num_images):
            height, width = (int(side) for side in rng.integers(100, max_side, size=2))
            images.append(Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)))
        chats.append((messages, images))
    return chats


def timed(function: Callable[..., object], *args: object, **kwargs: object) -> tuple[float, object]:
    """(CPU seconds of this process, result) of one call `function(*args, **kwargs)`.

    CPU time, not wall time: the benchmark machines are shared, and with torch pinned to one thread (the default)
    the process's CPU time is the work done, free of the neighbours' noise; on an idle core the two are equal.
    """
    start = time.process_time()
    result = function(*args, **kwargs)
    return time.process_time() - start, result


def run_with_threads(threads: int, run: Callable[[object], object], args: object) -> object:
    """`run(args)` with torch limited to `threads`, then the caller's setting back (tests run benchmarks in-process)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(previous)
