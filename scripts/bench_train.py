"""Stage-2 training throughput: the kit (padding-free packing) vs transformers' LlavaNextForConditionalGeneration.

One process, same weights (the peer loads the kit's LLaVA-NeXT export), same samples, same optimizer (AdamW over
projector + LLM, vision tower frozen as in stage 2), fp32 on CPU. Steps of the variants are interleaved so that
machine noise hits them alike. tokens/s counts real (unpadded) tokens, identical for every variant.

    python scripts/bench_train.py            # ~1-2 min on 2 cores; --quick for a smoke run
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
from pathlib import Path

import torch
from bench_common import build_kit, export_peer, make_chats, run_with_threads, timed, to_llava_next_pixels

from rice_mllm.data.collate import PaddingCollator
from rice_mllm.data.packing import LengthGroupedSampler, PackedBatchSampler, PackingCollator
from rice_mllm.mllm.per_sample_attention import PER_SAMPLE_SDPA

PEER = "transformers LlavaNext, padded"
PACKED_PER_SAMPLE = "rice_mllm, packed, per-sample attention"


def stage2_optimizer(parameters: dict[str, torch.nn.Parameter], frozen_prefix: str) -> torch.optim.Optimizer:
    """AdamW over everything but the vision tower, which is frozen (stage 2 without the optional encoder lr)."""
    trainable = []
    for name, parameter in parameters.items():
        parameter.requires_grad_(not name.startswith(frozen_prefix))
        if parameter.requires_grad:
            trainable.append(parameter)
    return torch.optim.AdamW(trainable, lr=1e-5)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> float:
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Run the benchmark, print tokens/s and ratios vs transformers.

    Returns:
        {"tokens_per_s": {variant: rate}, "loss": {side: loss of batch 0 before training}}.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 steps: a smoke run")
    parser.add_argument("--size", choices=["default", "wide"], default="default", help="model size (bench_common)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=1024,
        help="packed row width (about the longest sample: on CPU, attention over a row costs its width squared)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (timings are CPU seconds, see timed)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return run_with_threads(args.threads, _run, args)


def _run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    size, steps, batch_size = ("quick", 2, 3) if args.quick else (args.size, args.steps, args.batch_size)
    kit, processor = build_kit(size, args.seed)
    chats = make_chats(steps * batch_size, args.seed, max_side=200 if args.quick else 800)
    samples = [processor(messages, images) for messages, images in chats]
    lengths = [len(sample["input_ids"]) for sample in samples]
    max_tokens = max(lengths) if args.quick else args.max_tokens
    batches = [list(range(i, i + batch_size)) for i in range(0, len(samples), batch_size)]
    grouped = LengthGroupedSampler(lengths, batch_size, group_batches=steps, seed=args.seed).batches()
    # Packed steps get rows enough for the padded steps' real tokens on average: same data, same tokens per step.
    rows = math.ceil(sum(lengths) / steps / max_tokens)
    packed = PackedBatchSampler(lengths, max_tokens, rows, seed=args.seed).batches()

    pad = PaddingCollator(processor.pad_token_id)
    pack = PackingCollator(max_tokens, processor.pad_token_id)
    geometry = kit.geometry
    with tempfile.TemporaryDirectory() as tmp:
        peer = export_peer(kit, processor, Path(tmp))
    # The same weights attending per sample (the trainer's default without flash-attn): packed rows sample by sample,
    # right-padded batches causal without the padding mask.
    kit_per_sample = copy.deepcopy(kit)
    kit_per_sample.set_llm_attn_implementation(PER_SAMPLE_SDPA)
    variants = {  # name -> (model, collate, batches)
        PEER: (peer, lambda chunk: to_llava_next_pixels(pad(chunk), geometry), batches),
        "rice_mllm, padded": (kit, pad, batches),
        "rice_mllm, length-grouped, padded": (kit, pad, grouped),
        "rice_mllm, length-grouped, padded, per-sample attention": (kit_per_sample, pad, grouped),
        "rice_mllm, packed, row attention": (kit, pack, packed),
        PACKED_PER_SAMPLE: (kit_per_sample, pack, packed),
    }
    inputs = {
        name: [collate([samples[i] for i in b]) for b in step_batches]
        for name, (_, collate, step_batches) in variants.items()
    }

    # Same weights, same samples: the losses must agree before any update (packing keeps the per-token mean).
    with torch.no_grad():
        first = [samples[i] for i in batches[0]]
        losses = {
            PEER: peer.train()(**inputs[PEER][0]).loss.item(),
            "rice_mllm, padded": kit.train()(**pad(first)).loss.item(),
            "rice_mllm, packed": kit(**pack(first)).loss.item(),
            "rice_mllm, packed, per-sample": kit_per_sample.train()(**pack(first)).loss.item(),
            "rice_mllm, padded, per-sample": kit_per_sample(**pad(first)).loss.item(),
        }
    optimizers = {
        id(peer): stage2_optimizer(dict(peer.named_parameters()), "model.vision_tower."),
        id(kit): stage2_optimizer(dict(kit.named_parameters()), "vision_tower."),
        id(kit_per_sample): stage2_optimizer(dict(kit_per_sample.named_parameters()), "vision_tower."),
    }
    for name, (model, _, _) in variants.items():  # warm-up: allocator, optimizer state, lazy inits
        train_step(model, optimizers[id(model)], inputs[name][0])
    elapsed = dict.fromkeys(variants, 0.0)
    for step in range(max(len(step_batches) for _, _, step_batches in variants.values())):
        for name, (model, _, _) in variants.items():
            if step < len(inputs[name]):
                elapsed[name] += timed(train_step, model, optimizers[id(model)], inputs[name][step])[0]

    real_tokens = sum(lengths)
    padded = {name: sum(batch["input_ids"].numel() for batch in inputs[name]) for name in variants}
    print(
        f"{len(samples)} samples ({real_tokens} tokens, lengths {min(lengths)}-{max(lengths)}); padded: {steps} steps "
        f"of {batch_size} samples; packed: {len(packed)} steps of {rows} rows of {max_tokens} tokens; "
        f"torch threads {torch.get_num_threads()}; model size {size!r}"
    )
    print("loss on batch 0 before training: " + ", ".join(f"{name}: {loss:.6f}" for name, loss in losses.items()))
    rates = {name: real_tokens / value for name, value in elapsed.items()}
    for name, rate in rates.items():
        print(
            f"{name:56s} {rate:9.1f} tokens/s  computed {padded[name]:6d} positions "
            f"({real_tokens / padded[name]:4.0%} real)  ratio vs transformers {rate / rates[PEER]:5.2f}x"
        )
    return {"tokens_per_s": rates, "loss": losses}


if __name__ == "__main__":
    main()
