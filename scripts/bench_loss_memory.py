"""Stage-2 step with Qwen2.5's real vocabulary: the kit's chunked LM loss vs transformers' plain loss, memory and speed.

Both sides train the same CPU-sized Qwen2-shaped LLM (same weights, same batch, AdamW): the kit through
`RiceMllmForConditionalGeneration` (text-only batch, vision tower frozen as in stage 2), transformers through
`Qwen2ForCausalLM(labels=...)`, which builds fp32 logits [tokens, vocab] before its cross-entropy. The vocabulary has
151,936 rows, the qwen2.5-0.5b preset's embedding: logits cover every row (the tokenizer's 151,665 ids, the kit's
`<image>` and Qwen's padding rows), so that is the width a real step computes.

Memory: each side runs in a fresh process (peaks do not mix). Before each timed step its peak RSS is reset
(Linux `/proc/self/clear_refs`); after it, VmHWM is the step's peak. Printed: that peak (interpreter, model, optimizer
state and the step's transients) and the step's growth over the RSS it started from. Speed: CPU seconds of the timed
steps (see bench_common.timed), after one warm-up step that allocates the optimizer state.

    python scripts/bench_loss_memory.py      # ~2 min on 2 cores; --quick for a smoke run
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import re
from pathlib import Path

import torch
from bench_common import SIZES, timed
from bench_train import train_step
from transformers import Qwen2ForCausalLM

from rice_mllm.mllm.configuration import RiceMllmConfig
from rice_mllm.mllm.lm_loss import chunk_tokens_for
from rice_mllm.mllm.modeling import RiceMllmForConditionalGeneration
from rice_mllm.presets import load_preset

PEER = "transformers Qwen2ForCausalLM(labels)"
KIT = "rice_mllm chunked loss"
IMAGE_TOKEN_ID = 151_665  # the kit's <image>: the id after Qwen2.5's 151,665 tokenizer ids
REGULAR_IDS = 151_643  # Qwen2.5's ordinary tokens (special tokens start here): what the batch is drawn from
# the order of bench_common.SIZES' "llm" tuples: the `default` stand-in has Qwen2.5's proportions
LLM_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := current RSS


def build_models(size: str, seed: int) -> tuple[RiceMllmForConditionalGeneration, Qwen2ForCausalLM]:
    """The kit model (tiny vision tower, Qwen2-shaped LLM with 151,936 rows) and transformers' LLM with its weights."""
    text = {**load_preset("qwen2.5-0.5b"), **dict(zip(LLM_FIELDS, SIZES[size]["llm"], strict=True))}
    config = RiceMllmConfig(vision_config=load_preset("rice-vit-tiny"), text_config=text, image_token_id=IMAGE_TOKEN_ID)
    torch.manual_seed(seed)
    kit = RiceMllmForConditionalGeneration(config)
    peer = Qwen2ForCausalLM(kit.config.text_config)
    peer.load_state_dict(kit.language_model.state_dict())
    return kit, peer


def make_batch(batch_size: int, tokens: int, supervised: float, seed: int) -> dict[str, torch.Tensor]:
    """Random ordinary token ids; the first (1 - supervised) of each row is a prompt (labels -100)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, REGULAR_IDS, (batch_size, tokens), generator=generator)
    labels = ids.clone()
    labels[:, : round(tokens * (1 - supervised))] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _run(variant: str, args: argparse.Namespace, queue: mp.Queue) -> None:
    torch.set_num_threads(args.threads)
    kit, peer = build_models(args.size, args.seed)
    if variant == KIT:
        model, frozen = kit.train(), "vision_tower."
        del peer
    else:
        model, frozen = peer.train(), "(nothing)"
        del kit
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(not name.startswith(frozen))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batch = make_batch(args.batch_size, args.tokens, args.supervised, args.seed)
    losses = [train_step(model, optimizer, batch)]  # warm-up: optimizer state, allocator
    cpu, peak, growth = 0.0, 0, 0
    for _ in range(args.steps):
        _reset_peak_rss()
        start = _status_kib("VmRSS")
        seconds, loss = timed(train_step, model, optimizer, batch)
        high = _status_kib("VmHWM")
        cpu, peak, growth, losses = cpu + seconds, max(peak, high), max(growth, high - start), [*losses, loss]
    queue.put(
        dict(
            losses=losses,
            tokens_per_s=args.steps * batch["input_ids"].numel() / cpu,
            peak_gib=peak / 2**20,
            step_gib=growth / 2**20,
        )
    )


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Run both sides, check they compute the same losses, print memory, tokens/s and the ratios.

    Returns:
        {"peak_gib" | "step_gib" | "tokens_per_s" | "loss": {side: value}}; "loss" is the first step's.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny LLM, 2 x 64 tokens, 1 timed step: a smoke run")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per row")
    parser.add_argument("--supervised", type=float, default=1.0, help="share of each row with labels (the rest -100)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (timings are CPU seconds)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.batch_size, args.tokens, args.steps = "quick", 2, 64, 1
    else:
        args.size = "default"
    context = mp.get_context("spawn")
    results = {}
    for variant in (PEER, KIT):
        queue = context.Queue()
        process = context.Process(target=_run, args=(variant, args, queue))
        process.start()
        process.join()  # before reading: a child that died never writes (its small dict fits the pipe)
        if process.exitcode != 0:
            raise RuntimeError(f"benchmark side {variant!r} exited with {process.exitcode}")
        results[variant] = queue.get()

    vocab, tokens = load_preset("qwen2.5-0.5b")["vocab_size"], args.batch_size * args.tokens
    print(
        f"LLM {SIZES[args.size]['llm']} (hidden, MLP, layers, heads, KV heads), vocabulary {vocab:,} rows; batch "
        f"{args.batch_size} x {args.tokens} tokens, {args.supervised:.0%} supervised; kit chunks of "
        f"{chunk_tokens_for(vocab)} tokens; full fp32 logits would be {tokens * vocab * 4 / 2**30:.2f} GiB; "
        f"torch threads {args.threads}"
    )
    diffs = [abs(a - b) for a, b in zip(results[KIT]["losses"], results[PEER]["losses"], strict=True)]
    print(f"loss |kit - transformers|: first step {diffs[0]:.2e}, after AdamW updates at most {max(diffs[1:]):.2e}")
    peer = results[PEER]
    for variant, result in results.items():
        print(
            f"{variant:40s} peak RSS {result['peak_gib']:6.2f} GiB (step +{result['step_gib']:5.2f} GiB)  "
            f"{result['tokens_per_s']:8.1f} tokens/s  ratio vs transformers: memory "
            f"{result['peak_gib'] / peer['peak_gib']:4.2f}x (step {result['step_gib'] / peer['step_gib']:4.2f}x), "
            f"speed {result['tokens_per_s'] / peer['tokens_per_s']:4.2f}x"
        )
    keys = ("peak_gib", "step_gib", "tokens_per_s")
    summary = {key: {variant: result[key] for variant, result in results.items()} for key in keys}
    return {**summary, "loss": {variant: result["losses"][0] for variant, result in results.items()}}


if __name__ == "__main__":
    main()
