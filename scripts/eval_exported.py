"""Score a kit model's transformers export on held-out questions, as `python -m rice_mllm.eval` scores the kit model.

    python scripts/eval_exported.py --model outputs/tiny-world/stage2_instruct --data outputs/tiny-world/data/
        qa_heldout.json --out outputs/exported [--kit-report outputs/tiny-world/eval.json]

Exports with `rice_mllm.export` (LLaVA-NeXT or OneVision, as the model needs), loads transformers' own classes from
the exported folder alone, answers greedily in left-padded batches, and scores with `rice_mllm.eval.score`; with the
kit's eval report, also how many answers are the same, question by question.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
)

from rice_mllm.data.sources import load_conversations, open_images
from rice_mllm.eval import eval_item, format_table, score
from rice_mllm.export import export_checkpoint
from rice_mllm.inference import decode_reply

CLASSES = {
    "llava_next": (LlavaNextForConditionalGeneration, LlavaNextProcessor),
    "llava_onevision": (LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor),
}


def _bare_onevision_processor(export_dir: Path) -> LlavaOnevisionProcessor:
    """The OneVision processor from the exported files, without its video processor: transformers cannot build one
    without torchvision (absent where torch is the CPU build), and the image path never uses it."""
    saved = json.loads((export_dir / "processor_config.json").read_text())
    processor = object.__new__(LlavaOnevisionProcessor)
    processor.image_processor = LlavaOnevisionImageProcessorPil.from_dict(saved["image_processor"])
    processor.tokenizer = AutoTokenizer.from_pretrained(export_dir)
    processor.chat_template = processor.tokenizer.chat_template
    for key in ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio", "image_token"):
        setattr(processor, key, saved[key])
    processor.image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    processor.video_token, processor.video_token_id = saved["video_token"], None
    return processor


def load_exported(export_dir: str | Path):
    """transformers' model (eval mode) and processor of an exported folder, from that folder alone."""
    export_dir = Path(export_dir)
    model_class, processor_class = CLASSES[AutoConfig.from_pretrained(export_dir).model_type]
    model = model_class.from_pretrained(export_dir).eval()
    if processor_class is LlavaOnevisionProcessor and importlib.util.find_spec("torchvision") is None:
        return model, _bare_onevision_processor(export_dir)
    return model, processor_class.from_pretrained(export_dir)


def answer(model, processor, prompts: list[tuple[list[dict], list]], max_new_tokens: int) -> list[str]:
    """Greedy replies to (messages, images) prompts in one left-padded batch, cut at `<|im_end|>`."""
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m, _ in prompts]
    images = [list(imgs) for _, imgs in prompts]
    batch = processor(text=texts, images=images if any(images) else None, padding=True, return_tensors="pt")
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        tokens = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
        )
    replies = []
    for row in tokens[:, batch["input_ids"].shape[1] :].tolist():
        replies.append(decode_reply(tokenizer, row[: row.index(eos)] if eos in row else row))
    return replies


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="kit model, checkpoint or run folder")
    parser.add_argument("--data", type=Path, required=True, help="LLaVA .json/.jsonl with reference answers")
    parser.add_argument("--out", type=Path, required=True, help="folder for the export")
    parser.add_argument("--kit-report", type=Path, help="the kit's `rice_mllm.eval --report` on the same data")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--limit", type=int)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    export_checkpoint(args.model, args.out)
    model, processor = load_exported(args.out)
    items = [eval_item(conversation) for conversation in load_conversations(args.data)[: args.limit]]
    predictions: list[str] = []
    for start in range(0, len(items), args.batch_size):
        prompts = [(item.messages, open_images(item.conversation)) for item in items[start : start + args.batch_size]]
        predictions += answer(model, processor, prompts, args.max_new_tokens)
    report = score(items, predictions)
    print(f"transformers {type(model).__name__} from {args.out}:\n{format_table(report)}")
    if args.kit_report:
        kit = json.loads(args.kit_report.read_text())["predictions"]
        same = sum(a["prediction"] == b["prediction"] for a, b in zip(kit, report["predictions"], strict=True))
        print(f"the same answer as the kit on {same} of {len(kit)} questions")
        report["same_as_kit"] = same
    return report


if __name__ == "__main__":
    main()
