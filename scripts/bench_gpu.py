"""Stage-2 training step on one GPU: RICE-ViT-L/14-560 + a Qwen2.5-1.5B-shaped LLM, packed rows, bf16; tokens/s and MFU.

Setting (random weights, nothing downloaded): the kit's model (RiceMllmForConditionalGeneration) over the preset
`rice-vit-l14-560` (frozen; layer -2 feeds the projector, so 23 of its 24 blocks run) and a Qwen2 LLM of Qwen2.5-1.5B's
published shape (Qwen/Qwen2.5-1.5B's config.json and model card on the Hugging Face hub: hidden 1536, 28 layers, 12
query / 2 KV heads, MLP 8960, vocabulary 151,936, tied embeddings, rope theta 1e6; 1.54B parameters, 1.31B without
the embedding). The step is the kit trainer's: stage `stage2_instruct` (projector + image_newline + LLM trained)
through `rice_mllm.train.engine.build_engine`, i.e. TorchEngine with optim.bf16: fp32 weights and AdamW state, the
forward under torch.autocast(bf16), gradients clipped at 1.0; the LLM attends as the trainer's `auto` picks
(flash_attention_2 where flash-attn imports, else the kit's per-sample SDPA). Data: `bench_common.make_chats` with the
kit's tiny tokenizer (the ids are small, the logits span all 151,936), images 100-560 px a side (one 1x1 grid + base
tile: up to 3,240 tokens; a bigger image's 2x2+1 tiles would take 8,080, a whole row) and base tiles only for the
images of multi-image samples (LLaVA-OneVision). PackedBatchSampler + PackingCollator fill rows of 8192 tokens: a
one-image sample takes 1.9-3.3K tokens, so rows of 4096 end up ~75% real on this mix, rows of 8192 ~90%. A step is 4
rows (32K tokens), run as micro-batches of 1 row with gradient accumulation; estimated peak ~52 GiB: fp32 weights,
gradients and AdamW 24 GiB, their bf16 copies 3, activations 24 (3.2 MB a token, measured on the CPU for these LLM
layers under bf16 autocast), the chunked loss (mllm/lm_loss.py) ~1. Out of memory: --row-tokens 4096 --rows 8.

MFU = model FLOPs of a step / step time / the GPU's dense bf16 peak, counting matmuls only (norms, softmax, RoPE, the
optimizer and the recomputation of --gradient-checkpointing are left out):
    LLM, trained:          6 * P_layers * T  +  6 * V * h * T_sup  +  6 * L * d * sum_i s_i^2
    projector, trained:    6 * P_proj * tiles * n
    vision, frozen:        tiles * (2 * P_patch * n  +  2 * P_blocks * (n + 1)  +  4 * L_v * d_v * (n + 1)^2)
P_layers: weights of the decoder layers' linears; T: real tokens of the step (padding not counted); V x h: the LM
head, tied or not, run only at the T_sup tokens that have a label to predict (the kit's chunked loss, mllm/lm_loss.py,
builds no other logits, and the loss needs none); s_i: each sample's length; L, d: LLM layers and query heads x head
dim; P_proj: the projector's weights (6x is a hair high: no input gradient flows into the frozen tower); n: patches per
tile; P_patch, P_blocks, L_v, d_v: the patch embedding, the linears of the blocks that run, their number and width.
Forward = 2 FLOPs per weight per token, training = 3x forward. Attention is counted per sample and causal (QK^T and
AV over half of each s_i x s_i matrix): that is what flash-attn's varlen kernel and the per-sample SDPA compute;
PaLM's 12 * L * H * Q * T would also credit the masked half (and, in a packed row, other samples' tokens) that no
kernel needs. Peak: NVIDIA's datasheet dense bf16 tensor-core figure for the device name (PEAK_BF16_TFLOPS), or
--peak-tflops.

    python scripts/bench_gpu.py                           # one GPU; estimated 1-2 min on an H100 (not run there yet)
    python scripts/bench_gpu.py --quick --peak-tflops 1   # smoke run: tiny presets, fp32, 2 steps, CPU if no CUDA
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
from bench_common import make_chats
from torch import nn

from rice_mllm.constants import IGNORE_INDEX
from rice_mllm.data.packing import PackedBatchSampler, PackingCollator
from rice_mllm.mllm.assembly import TINY_TOKENIZER, build_processor
from rice_mllm.mllm.configuration import RiceMllmConfig
from rice_mllm.mllm.modeling import RiceMllmForConditionalGeneration
from rice_mllm.mllm.processing import RiceMllmProcessor
from rice_mllm.presets import load_preset
from rice_mllm.train.builders import ATTN_IMPLEMENTATIONS, llm_attn_implementation
from rice_mllm.train.config import ModelConfig, OptimConfig, TrainConfig
from rice_mllm.train.engine import build_engine, device
from rice_mllm.train.stages import apply_stage, get_stage

# Qwen/Qwen2.5-1.5B config.json (Hugging Face hub), over the tiny preset's remaining Qwen2 fields.
QWEN2_5_1_5B = {
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
}
# Dense bf16 tensor-core peaks (NVIDIA datasheets; the sparse figures are twice these), matched in order against
# torch.cuda.get_device_name: the specific variants first.
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H100", 989.0),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    ("H200", 989.0),  # SXM
    ("A100", 312.0),
]
GIB = 2**30


@dataclass(frozen=True)
class FlopShapes:
    """What the FLOP count of a step needs from the model (see the module docstring for the symbols)."""

    llm_layer_params: int  # P_layers
    llm_head_params: int  # V x h
    llm_layers: int  # L
    llm_attention_width: int  # d
    projector_params: int  # P_proj
    patch_params: int  # P_patch
    vision_block_params: int  # P_blocks
    vision_layers: int  # L_v
    vision_width: int  # d_v
    patches_per_tile: int  # n


def step_flops(shapes: FlopShapes, sample_lengths: list[int], supervised: int, tiles: int) -> int:
    """Model FLOPs of one training step over samples of these token lengths, `supervised` of their tokens with a label
    to predict, whose images gave `tiles` tiles."""
    s = shapes
    attention = s.llm_layers * s.llm_attention_width * sum(length**2 for length in sample_lengths)
    llm = 6 * s.llm_layer_params * sum(sample_lengths) + 6 * s.llm_head_params * supervised + 6 * attention
    projector = 6 * s.projector_params * tiles * s.patches_per_tile
    tokens = s.patches_per_tile + 1  # CLS
    vision = tiles * (
        2 * s.patch_params * s.patches_per_tile
        + 2 * s.vision_block_params * tokens
        + 4 * s.vision_layers * s.vision_width * tokens**2
    )
    return llm + projector + vision


def _linear_weights(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def flop_shapes(model: RiceMllmForConditionalGeneration) -> FlopShapes:
    """The FlopShapes of a kit model: the vision blocks past the feature layer (the model's unused parameters) and
    the token-embedding lookup count nothing; the LM head counts as a vocabulary x hidden matmul."""
    text, vision = model.config.text_config, model.config.vision_config
    unused = frozenset(model.unused_parameter_names())
    blocks = model.vision_tower.vision_model.encoder.layers
    used = [
        i
        for i in range(len(blocks))
        if not any(name.startswith(f"vision_tower.vision_model.encoder.layers.{i}.") for name in unused)
    ]
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return FlopShapes(
        llm_layer_params=_linear_weights(model.language_model.model.layers),
        llm_head_params=text.vocab_size * text.hidden_size,
        llm_layers=text.num_hidden_layers,
        llm_attention_width=text.num_attention_heads * head_dim,
        projector_params=_linear_weights(model.projector),
        patch_params=model.vision_tower.vision_model.embeddings.patch_embedding.weight.numel(),
        vision_block_params=sum(_linear_weights(blocks[i]) for i in used),
        vision_layers=len(used),
        vision_width=vision.hidden_size,
        patches_per_tile=(vision.image_size // vision.patch_size) ** 2,
    )


def peak_tflops(device_name: str, given: float | None) -> float | None:
    """--peak-tflops when given, else the table's figure for this device name (None for the CPU)."""
    if given is not None:
        return given
    if device_name == "cpu":
        return None
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops
    raise SystemExit(
        f"bench_gpu.py: no bf16 peak known for {device_name!r} (known: {', '.join(k for k, _ in PEAK_BF16_TFLOPS)}); "
        "pass --peak-tflops with its dense bf16 TFLOP/s"
    )


def build_model(vision: dict, text: dict, processor: RiceMllmProcessor) -> RiceMllmForConditionalGeneration:
    """A random-weight kit model of these configs, tiled as `processor` tiles."""
    geometry = processor.image_processor.geometry
    config = RiceMllmConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=processor.image_token_id,
        image_grid_pinpoints=[list(p) for p in geometry.image_grid_pinpoints],
        multi_image_tiling=geometry.multi_image_tiling,
    )
    return RiceMllmForConditionalGeneration(config)


def packed_steps(
    processor: RiceMllmProcessor, args: argparse.Namespace, micro_batches: int
) -> tuple[list[list[dict]], list[list[int]], int]:
    """`micro_batches` packed micro-batches of `args.micro_rows` rows, grouped into steps of `args.grad_accum`.

    Chats are drawn until they hold 20% more tokens than the rows and PackedBatchSampler plans more micro-batches
    than needed (its last ones are part-empty and go unused); chats longer than a row are left out and counted.

    Returns:
        (per step its collated micro-batches, per step its samples' lengths, samples left out).
    """
    chats, lengths, dropped, seed = [], [], 0, args.seed
    while True:
        for messages, images in make_chats(64, seed, max_side=args.max_side):
            length = len(processor.encode(messages, [(im.height, im.width) for im in images])["input_ids"])
            if length > args.row_tokens:
                dropped += 1
                continue
            chats.append((messages, images))
            lengths.append(length)
        seed += 1
        batches = PackedBatchSampler(lengths, args.row_tokens, args.micro_rows, seed=args.seed).batches()
        if len(batches) > micro_batches and sum(lengths) > 1.2 * micro_batches * args.micro_rows * args.row_tokens:
            break
    collate = PackingCollator(args.row_tokens, processor.pad_token_id)
    steps, step_lengths = [], []
    for start in range(0, micro_batches, args.grad_accum):
        group = batches[start : start + args.grad_accum]
        steps.append([collate([processor(*chats[i]) for i in indices]) for indices in group])
        step_lengths.append([lengths[i] for indices in group for i in indices])
    return steps, step_lengths, dropped


def one_row(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rows laid end to end: transformers' flash-attn path reads packed samples from position_ids only in a batch of
    one row (modeling_flash_attention_utils._is_packed_sequence); with more it would attend across samples."""
    return {k: v.reshape(1, -1) if k in ("input_ids", "labels", "position_ids") else v for k, v in batch.items()}


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and print the report.

    Returns:
        device, attn_implementation, step_s, tokens_per_s, flops_per_step, mfu (None without a peak),
        peak_memory_gib (None on the CPU), losses (first and last step), shapes (FlopShapes).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny presets, fp32, 2 steps: a smoke run (no GPU)")
    parser.add_argument("--row-tokens", type=int, default=8192, help="packed row width")
    parser.add_argument("--rows", type=int, default=4, help="rows per optimizer step")
    parser.add_argument("--micro-rows", type=int, default=1, help="rows per forward/backward (the rest accumulates)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (on the first step's batches)")
    parser.add_argument("--max-side", type=int, default=560, help="images are 100..max-side px a side")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--attn-implementation", choices=ATTN_IMPLEMENTATIONS, default="auto", help="the LLM's")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (needed for unknown GPUs)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.row_tokens, args.rows, args.micro_rows, args.steps, args.warmup, args.max_side = 512, 2, 1, 1, 1, 200
    elif not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py: no CUDA device (torch.cuda.is_available() is False); --quick runs on the CPU")
    if args.rows % args.micro_rows:
        raise SystemExit(f"bench_gpu.py: --rows {args.rows} is not a multiple of --micro-rows {args.micro_rows}")
    args.grad_accum = args.rows // args.micro_rows
    args.vision = "rice-vit-tiny" if args.quick else "rice-vit-l14-560"
    return _run(args)


def _timed_steps(engine, steps: list[list[dict]], warmup: int, dev: torch.device) -> tuple[float, list[float]]:
    """(seconds of the timed steps, mean loss of every step): `warmup` untimed steps on the first step's batches,
    then every step once; each runs its micro-batches as rice_mllm.train.trainer.train_step does."""

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def train_step(batches: list[dict]) -> float:
        total = 0.0
        for batch in batches:
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            total += loss.detach()
        return float(total) / len(batches)

    losses = [train_step(steps[0]) for _ in range(warmup)]
    sync()
    start = time.perf_counter()
    losses += [train_step(step) for step in steps]
    sync()
    return time.perf_counter() - start, losses


def _run(args: argparse.Namespace) -> dict:
    dev = device()
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = peak_tflops(device_name, args.peak_tflops)
    vision = load_preset(args.vision)
    text = load_preset("qwen2.5-tiny") if args.quick else dict(load_preset("qwen2.5-tiny"), **QWEN2_5_1_5B)
    processor = build_processor(TINY_TOKENIZER, tile_size=vision["image_size"], multi_image_tiling="base")
    text["vocab_size"] = max(text["vocab_size"], len(processor.tokenizer))
    steps, step_lengths, dropped = packed_steps(processor, args, args.steps * args.grad_accum)

    config = TrainConfig(
        stage="stage2_instruct",
        model=ModelConfig(
            gradient_checkpointing=args.gradient_checkpointing, attn_implementation=args.attn_implementation
        ),
        optim=OptimConfig(bf16=not args.quick, grad_accum=args.grad_accum, max_steps=args.warmup + args.steps),
    )
    torch.manual_seed(args.seed)
    model = build_model(vision, text, processor).train()
    attn = llm_attn_implementation(config)
    model.set_llm_attn_implementation(attn)
    if args.gradient_checkpointing:  # as the trainer enables it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    groups = apply_stage(model, get_stage(config.stage))
    engine = build_engine(model, groups, config, args.warmup + args.steps)  # moves the model to `dev`
    if attn == "flash_attention_2":
        steps = [[one_row(batch) for batch in step] for step in steps]
    steps = [[{k: v.to(dev) for k, v in batch.items()} for batch in step] for step in steps]
    try:
        elapsed, losses = _timed_steps(engine, steps, args.warmup, dev)
    except torch.OutOfMemoryError:
        raise SystemExit(
            f"bench_gpu.py: out of GPU memory at {args.micro_rows} row(s) x {args.row_tokens} tokens per micro-batch; "
            "lower --micro-rows or --row-tokens, or add --gradient-checkpointing"
        ) from None

    shapes = flop_shapes(model)
    tiles = [sum(batch["pixel_values"].shape[0] for batch in step) for step in steps]
    # labelled tokens = shifted targets: PackingCollator masks every sample's first label
    supervised = [sum(int((batch["labels"] != IGNORE_INDEX).sum()) for batch in step) for step in steps]
    flops = sum(map(step_flops, [shapes] * len(steps), step_lengths, supervised, tiles))
    tokens = sum(map(sum, step_lengths))
    result = {
        "device": device_name,
        "attn_implementation": attn,
        "step_s": elapsed / len(steps),
        "tokens_per_s": tokens / elapsed,
        "flops_per_step": flops / len(steps),
        "mfu": flops / elapsed / (peak * 1e12) if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(dev) / GIB if dev.type == "cuda" else None,
        "losses": (losses[0], losses[-1]),
        "shapes": shapes,
    }
    image_tokens = sum(int((b["input_ids"] == processor.image_token_id).sum()) for step in steps for b in step)
    llm_flops = sum(map(step_flops, [shapes] * len(steps), step_lengths, supervised, [0] * len(steps)))  # no tiles
    print(f"device: {device_name}; peak {f'{peak:g} TFLOP/s' if peak else 'n/a (give --peak-tflops)'}")
    print(
        f"model: {args.vision} (frozen, blocks run: {shapes.vision_layers}) + "
        f"{'qwen2.5-tiny' if args.quick else 'Qwen2.5-1.5B-shaped'} LLM "
        f"({sum(p.numel() for p in model.language_model.parameters()):,} parameters); "
        f"trainable {sum(p.numel() for p in model.parameters() if p.requires_grad):,}"
    )
    print(
        f"precision: {'fp32 weights and AdamW, bf16 autocast' if config.optim.bf16 else 'fp32'} (the kit's "
        f"TorchEngine); LLM attention {attn}; gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}"
    )
    print(
        f"data: {sum(map(len, step_lengths))} samples, {tokens:,} real tokens ({image_tokens / tokens:.0%} image "
        f"tokens, {sum(supervised) / tokens:.0%} supervised), {sum(tiles)} tiles; {dropped} chats longer than a row "
        "left out"
    )
    print(
        f"step: {args.rows} rows x {args.row_tokens} tokens ({tokens / len(steps) / args.rows / args.row_tokens:.0%} "
        f"real) in micro-batches of {args.micro_rows} row(s); "
        f"{args.warmup} warm-up + {len(steps)} timed steps; loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    )
    print(f"step time {result['step_s']:.3f} s; tokens/s {result['tokens_per_s']:,.0f}")
    mfu = result["mfu"]
    print(
        f"model FLOPs per step {result['flops_per_step']:.3e} (LLM {llm_flops / flops:.1%}); "
        f"MFU {f'{mfu:.1%}' if mfu is not None else 'n/a'}"
    )
    memory = result["peak_memory_gib"]
    print(f"peak GPU memory {f'{memory:.1f} GiB allocated' if memory is not None else 'n/a (CPU)'}")
    return result


if __name__ == "__main__":
    main()
