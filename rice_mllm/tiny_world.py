"""`python -m rice_mllm.tiny_world`: the whole kit, offline, on the embedded tiny world, in minutes on a CPU.

Generates the world, pretrains a RICE encoder with region cluster discrimination (stage 0), aligns the projector
(stage 1), instruction-tunes (stage 2), evaluates on unseen images (with and without the image features) and answers
one question about an unseen image. Every stage is the real recipe (`recipes/*.yaml`) with the overrides below: the
plan is data, and each override can be changed from the command line as `stage.key=value`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .checkpoint_layout import resolve_model_dir
from .data.sources import load_conversations, open_images, region_messages
from .data.synthetic import generate
from .data.synthetic_scene import WorldConfig
from .eval import main as eval_main
from .inference import answer, load_for_inference
from .presets import load_preset
from .train.trainer import main as train_main

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ENCODER = "rice-vit-tiny-world-p16"
# Square images of the encoder's tile size, words typeset on its patch grid (both read from its preset, so they
# cannot drift apart); up to four shapes and a word, as in the default world. 20 px type fits a word in one 32 px
# row of the 3x3 grid.
_ENCODER_CONFIG = load_preset(ENCODER)
WORLD = WorldConfig(
    min_side=_ENCODER_CONFIG["image_size"],
    max_side=_ENCODER_CONFIG["image_size"],
    word_grid=_ENCODER_CONFIG["patch_size"],
    word_size=20,
)

# Per stage: the recipe it runs and what the tiny world changes in it. `{out}` is the run folder. Why, in short (the
# measurements behind each choice are in the commit history):
# - The tiny models start from scratch, so stage 2 trains at the stage-1 scale of learning rate (lr_scale) and warms
#   up over 10% of its steps.
# - Stage 0 runs 10 epochs (as many as the time budget allows) and weighs the OCR loss, which teaches each shape's
#   box the words of its cell ("top left"), as much as the object loss: RICE-ViT has no absolute position embedding.
#   The region head could read the cell from its RoPE alone; drawing the head's RoPE origin at random
#   (`pretrain.rope_jitter`) makes the tokens the LLM reads learn it: position and grounding answers gain most.
# - The LLM is `qwen2.5-tiny-world` (4 KV heads, not 2): with jitter, 2 KV heads failed to bind colour to shape in
#   more runs. Training records also ask every colour and shape question an image allows (the generator's
#   BINDING_TYPES) for the same reason.
# - Stage 2 trains the encoder too (the recipe's optional part, at its fifth of the LLM's rate): 84-86% held out in
#   three of four seeds (74% in one) against 77-83% frozen (3 seeds), for 11% more time; `stage2.optional_parts=[]`
#   freezes it.
# - Images are one 96 px tile: 6x6 patches of 16 px, so each cell of the world's 3x3 grid is 2x2 patches, and every
#   sample has the same layout (78 tokens). Stage 2 trains on one record per image, its questions then its caption;
#   records of 30 to 340 tokens are batched by length (the stage-2 recipe).
# - Stage 2 takes batches of 8 records: twice the updates of batches of 16 at the same tokens/s, which the LLM,
#   learning from scratch, needs more than a smoother gradient (4 seeds: 85.4-92.4% held out against 84.5-91.8%,
#   grounding and binding gain most). Five epochs of 8 (the old step count, half the time) cost 13-21 points.
# - The two images of a pair give their base tile only (`multi_image_tiling="base"`, as LLaVA-NeXT's training code
#   and LLaVA-OneVision cut multi-image samples; set where stage 1 creates the model, which stage 2 inherits).
# - Stage 2 runs on the plain torch engine: in one CPU process ZeRO shards nothing and costs more per step.
# Stage 0's losses, softer than the paper's (s = 64, m = 0.3, rho = 0.1 of 1M centres) for an encoder that starts
# from scratch on 30 object classes: every class scored, and a narrow embedding for a 128-wide encoder.
TINY_STAGE0_LOSS = {
    "pretrain.embed_dim": "64",
    "pretrain.scale": "16.0",
    "pretrain.margin": "0.1",
    "pretrain.sample_ratio": "1.0",
}
PLAN: dict[str, tuple[str, dict[str, str]]] = {
    "stage0": (
        "stage0_rice_pretrain",
        {
            "model.vision": ENCODER,
            "data.tiny_world": "null",  # generated once, below
            "data.train_files": "[{out}/data/regions_train.jsonl]",
            "optim.epochs": "10",
            **TINY_STAGE0_LOSS,
            "pretrain.rope_jitter": "16",
            "output_dir": "{out}/stage0_rice_pretrain",
        },
    ),
    "stage1": (
        "stage1_align",
        {
            "model.vision": "{out}/stage0_rice_pretrain",
            "model.llm": "qwen2.5-tiny-world",
            "model.image_grid_pinpoints": "null",  # the recipe's LLaVA-NeXT grids make 2+ tiles of a 96 px image
            "model.max_tiles": "1",
            "model.multi_image_tiling": "base",
            # RICE's point: a box in a question brings the encoder's own region feature (its region transformer over
            # the box), not just its digits: region questions 98-99% held out, 64.5-71.5% with
            # `stage1.model.region_tokens=false` (boxes as text; README Status).
            "model.region_tokens": "true",
            # A box's edges fall inside 16 px patches; the block term sees where in its 2x2 block an object's parts lie
            # (grounding 69.5-81.5% against 59.5-75.5% with `mlp2x_gelu`, four seeds each; git log has the runs).
            "model.projector": "mlp2x_gelu_block",
            # ChatML beat the recipe's LLaVA plain here, same stage 0: 84.3% against 83.2% held out (git log has both)
            "data.template": "chatml",
            "data.tiny_world": "null",  # generated once, below
            "data.train_files": "[{out}/data/captions_train.json]",
            "optim.epochs": "1",
            "optim.batch_size": "16",
            "optim.lr_scale": "2",
            "output_dir": "{out}/stage1_align",
        },
    ),
    "stage2": (
        "stage2_instruct",
        {
            "model.init_from": "{out}/stage1_align",
            "optional_parts": "[vision]",
            "data.tiny_world": "null",  # generated once, below
            "data.train_files": "[{out}/data/qa_train.json]",
            "optim.epochs": "10",
            "optim.batch_size": "8",
            "optim.lr_scale": "100",
            "optim.warmup_ratio": "0.1",
            "deepspeed": "null",
            "output_dir": "{out}/stage2_instruct",
        },
    ),
}


def stage_arguments(stage: str, out: Path, overrides: dict[str, str]) -> list[str]:
    """The trainer's argv for one stage of the plan, with the command line's `stage.key=value` applied."""
    recipe, settings = PLAN[stage]
    settings = {**settings, **overrides}
    return ["--config", str(RECIPES / f"{recipe}.yaml"), *(f"{k}={v.format(out=out)}" for k, v in settings.items())]


def parse_overrides(items: list[str]) -> dict[str, dict[str, str]]:
    """`stage2.optim.epochs=3` -> {"stage2": {"optim.epochs": "3"}}; unknown stages raise, listing the valid ones."""
    parsed: dict[str, dict[str, str]] = {stage: {} for stage in PLAN}
    for item in items:
        key, sep, value = item.partition("=")
        stage, _, setting = key.partition(".")
        if not sep or stage not in PLAN or not setting:
            raise SystemExit(f"override {item!r} must look like STAGE.key=value with STAGE in {sorted(PLAN)}")
        parsed[stage][setting] = value
    return parsed


def demo_answer(model_dir: Path, heldout: Path) -> None:
    """Answer the first held-out question about an image, as `python -m rice_mllm.chat` would."""
    record = next(c for c in load_conversations(heldout) if c.images)
    model, processor = load_for_inference(model_dir, device="cpu")
    messages = region_messages(record)  # `<region>` placeholders -> box texts, as eval renders them
    context, reference = messages[:-1], messages[-1]["content"]
    reply = answer(model, processor, context, open_images(record), max_new_tokens=16)
    question = context[-1]["content"].replace("<image>", "").strip()
    print(f"\nunseen image {record.images[0]}\n  question: {question}\n  answer:   {reply}   (reference: {reference})")
    print(f"chat with it: python -m rice_mllm.chat --model {model_dir} --image {record.images[0]}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m rice_mllm.tiny_world", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/tiny-world"), help="run folder")
    parser.add_argument("--images", type=int, default=3000, help="training images in the generated world")
    parser.add_argument("--heldout", type=int, default=200, help="unseen images evaluated (about 8.6 questions each)")
    parser.add_argument("overrides", nargs="*", help="STAGE.key=value, e.g. stage2.optim.epochs=3")
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.overrides)
    started = time.monotonic()
    generate(
        args.out / "data",
        seed=0,
        num_images=args.images,
        num_heldout=args.heldout,
        config=WORLD,
        qa_per_image=5,
        progress=True,
        merge_train_qa=True,
        reuse_existing=True,
    )
    timings = {}
    for stage in PLAN:
        print(f"\n== {stage}: {PLAN[stage][0]}")
        stage_start = time.monotonic()
        train_main(stage_arguments(stage, args.out, overrides[stage]))
        timings[stage] = round(time.monotonic() - stage_start, 1)
    model_dir = resolve_model_dir(args.out / "stage2_instruct")
    heldout = args.out / "data" / "qa_heldout.json"
    print("\n== evaluation on unseen images")
    report = eval_main(["--model", str(model_dir), "--data", str(heldout), "--report", str(args.out / "eval.json")])
    print("\n== the same, with the image features blanked (a model that reads the images drops to chance)")
    blank = eval_main(["--model", str(model_dir), "--data", str(heldout), "--blank-images"])
    demo_answer(model_dir, heldout)
    summary = {"timings_s": timings, "total_s": round(time.monotonic() - started, 1), "eval": report, "blank": blank}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\ndone in {summary['total_s']:.0f} s; summary in {args.out / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()
