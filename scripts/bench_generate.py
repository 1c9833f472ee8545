"""Generation speed: the kit's `generate` vs transformers' LlavaNextForConditionalGeneration.generate, same weights.

One process; the peer loads the kit model's LLaVA-NeXT export (rice_mllm.export) and its LlavaNextProcessor.
Time to first token is end to end (PIL image + messages -> first token id), each side with its own processor;
tokens/s is greedy decoding of --new-tokens tokens from identical input tensors (the token ids are checked equal).
Batch 1, as in chat; calls are interleaved and each figure is the median over prompts and repeats.

    python scripts/bench_generate.py         # ~1 min on 2 cores; --quick for a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from bench_common import build_kit, export_peer, make_chats, run_with_threads, timed, to_llava_next_pixels
from transformers import LlavaNextProcessor

PEER, KIT = "transformers LlavaNext.generate", "rice_mllm generate"


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Run the benchmark, print TTFT and tokens/s with ratios, return {side: {"ttft_s", "tokens_per_s"}}."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 prompts, 4 tokens: a smoke run")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (timings are CPU seconds, see timed)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return run_with_threads(args.threads, _run, args)


def _run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    size, prompts, repeats, new_tokens = ("quick", 2, 1, 4) if args.quick else ("default", *_sizes(args))
    kit, processor = build_kit(size, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        peer = export_peer(kit, processor, Path(tmp)).eval()
        peer_processor = LlavaNextProcessor.from_pretrained(Path(tmp) / "hf")
    kit.eval()
    chats = [(messages[:1], images) for messages, images in make_chats(prompts, args.seed + 1)]
    greedy = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    def kit_first_token(messages, images):
        sample = processor(messages, images, add_generation_prompt=True)
        kit.generate(sample["input_ids"][None], **_pixels(sample), max_new_tokens=1, do_sample=False)

    def peer_first_token(messages, images):
        text = peer_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = peer_processor(text=text, images=images or None, return_tensors="pt")
        peer.generate(**inputs, max_new_tokens=1, do_sample=False)

    ttft = {PEER: [], KIT: []}
    decode = {PEER: [], KIT: []}
    mismatches = 0
    with torch.no_grad():
        kit_first_token(*chats[0])  # warm-up both sides
        peer_first_token(*chats[0])
        for _ in range(repeats):
            for messages, images in chats:
                ttft[PEER].append(timed(peer_first_token, messages, images)[0])
                ttft[KIT].append(timed(kit_first_token, messages, images)[0])
                sample = processor(messages, images, add_generation_prompt=True)
                ids = sample["input_ids"][None]
                peer_inputs = to_llava_next_pixels(dict(input_ids=ids, **_pixels(sample)), kit.geometry)
                peer_seconds, peer_tokens = timed(peer.generate, **peer_inputs, **greedy)
                kit_seconds, kit_tokens = timed(kit.generate, ids, **_pixels(sample), **greedy)
                decode[PEER].append(peer_seconds)
                decode[KIT].append(kit_seconds)
                mismatches += not torch.equal(peer_tokens[:, ids.shape[1] :], kit_tokens)

    result = {
        side: {"ttft_s": statistics.median(ttft[side]), "tokens_per_s": new_tokens / statistics.median(decode[side])}
        for side in (PEER, KIT)
    }
    print(
        f"{prompts} prompts x {repeats} repeats, batch 1, {new_tokens} greedy tokens, model size {size!r}, "
        f"torch threads {torch.get_num_threads()}; generations with different tokens: {mismatches}"
    )
    for side, figures in result.items():
        ttft_ratio = result[PEER]["ttft_s"] / figures["ttft_s"]
        rate_ratio = figures["tokens_per_s"] / result[PEER]["tokens_per_s"]
        print(
            f"{side:32s} TTFT {figures['ttft_s'] * 1000:7.1f} ms (ratio vs transformers {ttft_ratio:4.2f}x)   "
            f"{figures['tokens_per_s']:7.1f} tokens/s (ratio vs transformers {rate_ratio:4.2f}x)"
        )
    return result


def _sizes(args: argparse.Namespace) -> tuple[int, int, int]:
    return args.prompts, args.repeats, args.new_tokens


def _pixels(sample: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"pixel_values": sample["pixel_values"], "image_sizes": sample["image_sizes"]}


if __name__ == "__main__":
    main()
