"""`python -m rice_mllm.eval`: accuracy of a kit checkpoint on a LLaVA-format file, overall and per type.

Each record's last assistant turn is the reference; the turns before it, gold answers included, are the prompt.
A reference holding a box (mllm/boxes.py) is scored by IoU: correct when the prediction holds a box whose IoU with the
reference's first box is >= 0.5 (normalised coordinates); every other reference by exact match. Records' `<region>`
placeholders become box texts measured on their own images, so `--blank-images` leaves the text as it was.
Invariant: every record is scored exactly once (a record that cannot be scored raises, naming it).
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from .checkpoint_layout import CheckpointFormatError
from .data.sources import (
    Conversation,
    DataFormatError,
    ImageLoadError,
    load_conversations,
    open_images,
    region_messages,
)
from .inference import answer_batch, load_for_inference, quiet_transformers
from .loading import CheckpointMismatchError
from .mllm.boxes import RegionError, box_iou, parse_boxes
from .mllm.processing import ImagePlaceholderError, RiceMllmProcessor, SampleTooLongError

ALL_TYPES = "all"  # question_type of records that have none
# Characters stripped from both ends before comparing: ASCII punctuation and whitespace ("Red." == "red").
STRIP = string.punctuation + string.whitespace
IOU_THRESHOLD = 0.5  # a predicted box counts at IoU >= 0.5 with the reference's (the usual grounding bar)


class EvalRecordError(ValueError):
    """A record that cannot be evaluated (e.g. its last turn is not an assistant answer)."""


def normalize_answer(text: str) -> str:
    """Lower case, surrounding punctuation and whitespace removed, inner whitespace runs collapsed to one space."""
    return " ".join(text.lower().strip(STRIP).split())


def exact_match(prediction: str, reference: str) -> bool:
    """Whether the two answers are equal after `normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(reference)


def score_answer(prediction: str, reference: str) -> dict:
    """{"metric", "iou", "correct"} of one answer: "iou" when the reference holds a box (iou: the best of the
    prediction's boxes against the reference's first, 0.0 when it has none), else "exact" (iou None)."""
    reference_boxes = parse_boxes(reference)
    if not reference_boxes:
        return {"metric": "exact", "iou": None, "correct": exact_match(prediction, reference)}
    iou = max((box_iou(box, reference_boxes[0]) for box in parse_boxes(prediction)), default=0.0)
    return {"metric": "iou", "iou": iou, "correct": iou >= IOU_THRESHOLD}


@dataclass(frozen=True)
class EvalItem:
    """One question: the conversation up to the reference answer, and that answer."""

    conversation: Conversation
    index: int
    id: str
    question_type: str
    messages: list[dict[str, str]]
    reference: str


def eval_item(conversation: Conversation) -> EvalItem:
    """Split a record into prompt messages and its reference (the last turn, which must be the assistant's), their
    `<region>` placeholders replaced by box texts (read from the image headers)."""
    try:
        messages = region_messages(conversation)
    except RegionError as error:
        raise EvalRecordError(str(error)) from None
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        roles = [message["role"] for message in messages]
        raise EvalRecordError(f"{conversation.location}: the last turn must be an assistant answer, roles are {roles}")
    metadata = conversation.metadata
    return EvalItem(
        conversation=conversation,
        index=conversation.index,
        id=str(metadata.get("id", conversation.index)),
        question_type=str(metadata.get("question_type", ALL_TYPES)),
        messages=messages[:-1],
        reference=messages[-1]["content"],
    )


def blank_image(processor: RiceMllmProcessor) -> Image.Image:
    """One tile-sized image of the processor's mean colour: it normalises to (almost) zero pixels.

    Every image of a record becomes this same image, so neither content nor size (which sets the image-token count
    and grid layout) reaches the model; the prompt keeps its `<image>` slots, so the text is what it was.
    """
    side = processor.image_processor.geometry.tile_size
    colour = tuple(round(255 * mean) for mean in processor.image_processor.image_mean)
    return Image.new("RGB", (side, side), colour)


def score(items: Sequence[EvalItem], predictions: Sequence[str]) -> dict:
    """Accuracy report, each answer scored by `score_answer`.

    Returns:
        {"overall": {"count", "correct", "accuracy"}, "per_type": {type: same}, "predictions": [per item: "index",
        "id", "question_type", "reference", "prediction", "metric", "iou", "correct"]}; types sorted by name.
    """
    if len(items) != len(predictions):
        raise ValueError(f"{len(items)} items but {len(predictions)} predictions")
    rows = [
        {
            "index": item.index,
            "id": item.id,
            "question_type": item.question_type,
            "reference": item.reference,
            "prediction": prediction,
            **score_answer(prediction, item.reference),
        }
        for item, prediction in zip(items, predictions, strict=True)
    ]

    def summary(selected: list[dict]) -> dict:
        correct = sum(row["correct"] for row in selected)
        return {"count": len(selected), "correct": correct, "accuracy": correct / len(selected) if selected else 0.0}

    types = sorted({row["question_type"] for row in rows})
    per_type = {kind: summary([row for row in rows if row["question_type"] == kind]) for kind in types}
    return {"overall": summary(rows), "per_type": per_type, "predictions": rows}


def format_table(report: dict) -> str:
    """The per-type and overall accuracies as an aligned text table."""
    rows = [*report["per_type"].items(), ("overall", report["overall"])]
    width = max(len("question_type"), *(len(kind) for kind, _ in rows))
    header = f"{'question_type':<{width}}  {'count':>6}  {'correct':>7}  {'accuracy':>8}"
    lines = [
        f"{kind:<{width}}  {stats['count']:>6}  {stats['correct']:>7}  {stats['accuracy']:>8.3f}"
        for kind, stats in rows
    ]
    rule = "-" * len(header)
    return "\n".join([header, rule, *lines[:-1], rule, lines[-1]])


def _check_renders(processor: RiceMllmProcessor, item: EvalItem, images: Sequence[Image.Image]) -> None:
    """Token-side rendering of one item (cheap: no pixels), so a bad record is named before its batch runs."""
    try:
        sample = processor.encode(item.messages, [(image.height, image.width) for image in images], True)
        processor.check_length(len(sample["input_ids"]))
    except (ImagePlaceholderError, SampleTooLongError) as error:
        raise EvalRecordError(f"{item.conversation.location}: {error}") from None


def predict(
    model,
    processor: RiceMllmProcessor,
    items: Sequence[EvalItem],
    batch_size: int = 8,
    blank_images: bool = False,
    progress: bool = True,
    **generation,
) -> list[str]:
    """Greedy (unless `generation` says otherwise) answers to every item, in order, `batch_size` at a time.

    Images are decoded per batch, so memory holds one batch of images; a missing or corrupt one raises, named.
    """
    blank = blank_image(processor) if blank_images else None
    predictions: list[str] = []
    with tqdm(total=len(items), desc="eval", unit="q", disable=not progress) as bar:
        for start in range(0, len(items), batch_size):
            batch = []
            for item in items[start : start + batch_size]:
                images = open_images(item.conversation) if blank is None else [blank] * len(item.conversation.images)
                _check_renders(processor, item, images)
                batch.append((item.messages, images))
            predictions += answer_batch(model, processor, batch, **generation)
            bar.update(len(batch))
    return predictions


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rice_mllm.eval", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="kit checkpoint directory")
    parser.add_argument("--data", type=Path, required=True, help="LLaVA .json/.jsonl with reference answers")
    parser.add_argument("--limit", type=int, help="evaluate the first N records only")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--blank-images", action="store_true", help="replace every image by one blank tile")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--load-4bit", action="store_true", help="4-bit NF4 LLM (bitsandbytes)")
    parser.add_argument("--report", type=Path, help="write the JSON report (with every prediction) here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        parser.error(f"--batch-size and --limit must be positive, got {args.batch_size} and {args.limit}")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Evaluate, print the table, optionally write the JSON report; returns the report."""
    args = parse_args(argv)
    conversations = load_conversations(args.data)[: args.limit]
    items = [eval_item(conversation) for conversation in conversations]  # format errors before the model loads
    model, processor = load_for_inference(args.model, args.device, args.dtype, args.load_4bit)
    predictions = predict(
        model,
        processor,
        items,
        args.batch_size,
        args.blank_images,
        not args.no_progress,
        max_new_tokens=args.max_new_tokens,
    )
    report = {
        "model": str(args.model),
        "data": str(args.data),
        "blank_images": args.blank_images,
        "limit": args.limit,
        **score(items, predictions),
    }
    print(format_table(report))
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"report written to {args.report}", file=sys.stderr)
    return report


if __name__ == "__main__":
    quiet_transformers()
    try:
        main()
    except (
        FileNotFoundError,
        DataFormatError,
        EvalRecordError,
        CheckpointFormatError,
        CheckpointMismatchError,
        ImageLoadError,
    ) as error:
        sys.exit(f"error: {error}")
