"""Why a tiny-world model's grounding answers miss: where wrong boxes land, whether boxes follow an object's place
within its cell of the world's 3x3 grid, and whether the tokens the LLM reads hold that place.

    python scripts/grounding_report.py outputs/tiny-world      # a `python -m rice_mllm.tiny_world` run folder

Reads the run's eval.json (held-out predictions), data/qa_heldout.json, data/regions_heldout.jsonl and its stage-2
model. Prints:
- misses by kind: a box on another object (its centre inside that object's box), on nothing, or on the right object
  with IoU < 0.5;
- right answers with and without a shape twin (another object of the asked one's shape, so only its colour tells
  them apart);
- for answers on the right object, the correlation of predicted and true box centres within the cell (near 0: the
  model writes one box per cell, whatever the object's place in it);
- the held-out R^2 of ridge probes reading an object's centre within its cell and its size from the projected
  base-tile tokens of that cell (the LLM's input), once with the tokens in order and once pooled as attention pools
  them (weighted by the object's share of each patch, order lost): a place the ordered probe reads but the pooled one
  does not is held only in which token is which, which the LLM's attention (a weighted sum) does not keep;
- for single-turn questions about an object with a shape twin, how much attention one token takes from the colour
  word and from the shape word (each word wherever the prompt and answer so far hold it; the head that gives each
  most): the token that writes the box's first coordinate (after the answer's text up to `<|box_start|>(`), and the
  one that writes the first word of the same question asked for the object's place in words ("Where is the blue
  circle?"). A box that never reads the colour word cannot tell twins apart.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from pathlib import Path

import torch
from PIL import Image

from rice_mllm.checkpoint_layout import resolve_model_dir
from rice_mllm.data.synthetic_regions import GROUNDING_SUFFIX
from rice_mllm.data.synthetic_scene import POSITIONS
from rice_mllm.inference import load_for_inference, prepare_inputs
from rice_mllm.mllm.boxes import BOX_START, REGION_TOKEN, box_to_pixels, parse_boxes
from rice_mllm.mllm.modeling import RiceMllmForConditionalGeneration
from rice_mllm.mllm.processing import RiceMllmProcessor
from rice_mllm.pretrain.region_data import read_region_jsonl

GRID = len(POSITIONS)  # the tiny world's 3x3 grid of places ("top left" ...)


def _centre(box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _inside(point, box) -> bool:
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


def heldout_regions(run: Path) -> list[dict]:
    """The run's held-out images with their objects' boxes (data/regions_heldout.jsonl)."""
    return [record for _, record in read_region_jsonl(run / "data/regions_heldout.jsonl")]


def grounding_answers(run: Path, regions: list[dict]) -> list[dict]:
    """Each held-out grounding answer: its image's objects, the true and the predicted pixel box (None: no box)."""
    report = json.loads((run / "eval.json").read_text())
    records = json.loads((run / "data/qa_heldout.json").read_text())
    objects = {r["image"]: r["objects"] for r in regions}
    answers = []
    for prediction in report["predictions"]:
        if prediction["question_type"] != "grounding":
            continue
        record = records[prediction["index"]]
        size = Image.open(run / "data" / record["image"]).size[::-1]  # (height, width)
        boxes = parse_boxes(prediction["prediction"])
        answers.append(
            {
                "size": size,
                "objects": objects[record["image"]],
                "truth": box_to_pixels(parse_boxes(prediction["reference"])[0], size),
                "box": box_to_pixels(boxes[0], size) if boxes else None,
                "correct": prediction["correct"],
            }
        )
    return answers


def miss_kinds(answers: list[dict]) -> Counter:
    """Wrong answers by where the predicted box's centre lands: another object, no object, or the right one."""
    kinds = Counter()
    for answer in answers:
        if answer["correct"]:
            continue
        if answer["box"] is None:
            kinds["no box"] += 1
            continue
        hit = [o["box"] for o in answer["objects"] if _inside(_centre(answer["box"]), o["box"])]
        if not hit:
            kinds["on nothing"] += 1
        elif list(answer["truth"]) in hit:
            kinds["right object, IoU < 0.5"] += 1
        else:
            kinds["another object"] += 1
    return kinds


def _shape(obj: dict) -> str:
    return obj["label"].split()[-1]  # labels are "<colour> <shape>"


def has_shape_twin(objects: list[dict], shape: str) -> bool:
    """Whether two of the image's objects have this shape, so only their colour tells them apart."""
    return [_shape(obj) for obj in objects].count(shape) > 1


def shape_twin_accuracy(answers: list[dict]) -> dict[str, tuple[int, int]]:
    """(right, asked) for objects with a shape twin and for the others: a box that follows the shape but not the
    colour lands on either twin."""
    counts = {"with a shape twin": [0, 0], "without": [0, 0]}
    for answer in answers:
        (asked,) = [o for o in answer["objects"] if o["box"] == list(answer["truth"])]
        tally = counts["with a shape twin" if has_shape_twin(answer["objects"], _shape(asked)) else "without"]
        tally[0] += answer["correct"]
        tally[1] += 1
    return {group: (right, asked) for group, (right, asked) in counts.items()}


def centre_correlation(answers: list[dict]) -> tuple[float, float, int]:
    """Correlation (across, down) of predicted and true centres within the cell, over answers on the right object."""
    on_target = [a for a in answers if a["box"] is not None and _inside(_centre(a["truth"]), a["box"])]
    correlations = []
    for axis in (0, 1):
        cell = [a["size"][1 - axis] / GRID for a in on_target]
        truth = [_centre(a["truth"])[axis] % c for a, c in zip(on_target, cell, strict=True)]
        predicted = [_centre(a["box"])[axis] % c for a, c in zip(on_target, cell, strict=True)]
        correlations.append(statistics.correlation(truth, predicted))
    return correlations[0], correlations[1], len(on_target)


def box_patch_weights(box, rows: range, cols: range, patch: float) -> torch.Tensor:
    """[len(rows), len(cols)] shares of the box's area in each patch (summing to 1): where an attention head that
    looks for the object puts its weight, so the pooled feature is what the LLM can read without the tokens' order."""
    x0, y0, x1, y1 = box
    across = torch.tensor([max(0.0, min(x1, (c + 1) * patch) - max(x0, c * patch)) for c in cols])
    down = torch.tensor([max(0.0, min(y1, (r + 1) * patch) - max(y0, r * patch)) for r in rows])
    weights = torch.outer(down, across)
    return weights / weights.sum()


def _ridge_r2(features: list[torch.Tensor], targets: list, ridge: float, train_fraction: float) -> list[float]:
    """Held-out R^2 per target column of a ridge regression, the first `train_fraction` of rows training it."""
    x, y = torch.stack(features).double(), torch.tensor(targets, dtype=torch.float64)
    split = int(train_fraction * len(x))
    mean, std = x[:split].mean(0), x[:split].std(0) + 1e-6
    x = torch.cat([(x - mean) / std, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    weights = torch.linalg.solve(x[:split].T @ x[:split] + ridge * eye, x[:split].T @ y[:split])
    error = x[split:] @ weights - y[split:]
    return (1 - error.pow(2).mean(0) / y[split:].var(0)).tolist()


def probe_r2(
    run: Path,
    regions: list[dict],
    model: RiceMllmForConditionalGeneration,
    processor: RiceMllmProcessor,
    ridge: float = 10.0,
    train_fraction: float = 0.75,
) -> dict[str, list[float]]:
    """Held-out R^2 of ridge regressions to (centre x, centre y in the cell, width, height) from the cell's projected
    base-tile tokens, objects of the first images training them, the others testing them. "in order": the tokens
    side by side, as a probe sees them; "pooled": their mean weighted by `box_patch_weights`, as attention sees them."""
    n = model.geometry.tile_features  # tokens per side of a tile
    in_order, pooled, targets = [], [], []
    with torch.no_grad():
        for record in regions:
            image = Image.open(run / "data" / record["image"]).convert("RGB")
            inputs = processor.image_processor([image])
            tokens = model.image_features(inputs["pixel_values"], inputs["image_sizes"])[: n * n].view(n, n, -1)
            patch, cell = image.width / n, image.width / GRID
            for obj in record["objects"]:
                cx, cy = _centre(obj["box"])
                row, col = int(cy // cell), int(cx // cell)
                rows = range(round(row * cell / patch), round((row + 1) * cell / patch))
                cols = range(round(col * cell / patch), round((col + 1) * cell / patch))
                block = tokens[rows.start : rows.stop, cols.start : cols.stop]
                in_order.append(block.reshape(-1))
                pooled.append((block * box_patch_weights(obj["box"], rows, cols, patch)[..., None]).sum((0, 1)))
                x0, y0, x1, y1 = obj["box"]
                targets.append([cx % cell, cy % cell, x1 - x0, y1 - y0])
    return {
        "in order": _ridge_r2(in_order, targets, ridge, train_fraction),
        "pooled": _ridge_r2(pooled, targets, ridge, train_fraction),
    }


def word_positions(ids: list[int], forms: list[list[int]], start: int) -> list[int]:
    """Positions from `start` on of every occurrence of any token sequence in `forms` (a word's spellings: with and
    without a leading space), so a word the answer repeats after the question counts in both places."""
    positions = set()
    for form in forms:
        for begin in range(start, len(ids) - len(form) + 1):
            if ids[begin : begin + len(form)] == form:
                positions.update(range(begin, begin + len(form)))
    if not positions:
        raise ValueError(f"none of the token sequences {forms} is in the prompt after position {start}")
    return sorted(positions)


def word_attention(attentions: tuple[torch.Tensor, ...], positions: list[int]) -> torch.Tensor:
    """[layers, heads] attention the last query position gives `positions` (summed over them), batch row 0."""
    return torch.stack([layer[0, :, -1, positions].sum(-1) for layer in attentions])


def twin_word_attention(
    run: Path, regions: list[dict], model: RiceMllmForConditionalGeneration, processor: RiceMllmProcessor
) -> dict[str, dict[str, float]]:
    """Per answer form ("box", "place in words"), the largest mean attention one head gives the colour word and the
    shape word, from the position that writes the box's first coordinate (or the answer's first word), over
    single-turn held-out grounding questions about an object with a shape twin."""
    model.language_model.set_attn_implementation("eager")  # SDPA returns no attention weights
    tokenizer = processor.tokenizer
    objects = {r["image"]: r["objects"] for r in regions}
    sums: dict[str, dict[str, torch.Tensor]] = {"box": {}, "place in words": {}}
    count = 0
    for record in json.loads((run / "data/qa_heldout.json").read_text()):
        turns = record["conversations"]
        if record.get("question_type") != "grounding" or len(turns) != 2:
            continue
        question, reference = turns[0]["value"], turns[1]["value"]
        colour, shape = question.split("Where is the ")[1].removesuffix(GROUNDING_SUFFIX).rstrip("?").split()
        if not has_shape_twin(objects[record["image"]], shape):
            continue
        image = Image.open(run / "data" / record["image"]).convert("RGB")
        box_prefix = reference.split(REGION_TOKEN)[0] + BOX_START + "("  # the answer written up to the first coordinate
        forms = {
            "box": (question, tokenizer(box_prefix, add_special_tokens=False)["input_ids"]),
            "place in words": (question.removesuffix(GROUNDING_SUFFIX), []),
        }
        spellings = {
            key: [tokenizer(text, add_special_tokens=False)["input_ids"] for text in (" " + word, word)]
            for key, word in (("colour word", colour), ("shape word", shape))
        }
        for form, (text, prefix) in forms.items():
            prompt = ([{"role": "user", "content": text}], [image])
            inputs = prepare_inputs(processor, [prompt], model.device, model.vision_tower.dtype)
            ids = torch.cat([inputs["input_ids"], torch.tensor([prefix], dtype=torch.long)], dim=1)
            inputs.update(input_ids=ids, attention_mask=torch.ones_like(ids))
            with torch.no_grad():
                attentions = model(**inputs, output_attentions=True).attentions
            ids_list = ids[0].tolist()
            after_image = len(ids_list) - ids_list[::-1].index(processor.image_token_id)  # the question and answer
            for key, word_forms in spellings.items():
                positions = word_positions(ids_list, word_forms, after_image)
                sums[form][key] = sums[form].get(key, 0) + word_attention(attentions, positions)
        count += 1
    if not count:
        return {}
    return {form: {key: (total / count).max().item() for key, total in totals.items()} for form, totals in sums.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a `python -m rice_mllm.tiny_world` run folder")
    args = parser.parse_args(argv)
    regions = heldout_regions(args.run)
    answers = grounding_answers(args.run, regions)
    kinds = miss_kinds(answers)
    twins = shape_twin_accuracy(answers)
    across, down, on_target = centre_correlation(answers)
    model, processor = load_for_inference(resolve_model_dir(args.run / "stage2_instruct"), device="cpu")
    r2 = probe_r2(args.run, regions, model, processor)
    attention = twin_word_attention(args.run, regions, model, processor)
    right = sum(a["correct"] for a in answers)
    print(f"grounding: {right} of {len(answers)} right (IoU >= 0.5); misses: {dict(kinds)}")
    print("right by the asked object: " + ", ".join(f"{group} {r} of {n}" for group, (r, n) in twins.items()))
    print(
        f"centre within the cell, predicted vs true ({on_target} answers on the right object): "
        f"correlation {across:.2f} across, {down:.2f} down"
    )
    for pooling, values in r2.items():
        print(
            f"ridge probe on the cell's projected tokens, {pooling}, held-out R^2: "
            + ", ".join(f"{name} {v:.2f}" for name, v in zip(("x", "y", "width", "height"), values, strict=True))
        )
    for form, words in attention.items():
        print(
            f"shape-twin questions, {form} answer: attention of the token writing it (most attentive head) to the "
            + ", ".join(f"{word} {share:.2f}" for word, share in words.items())
        )
    return {
        "right": right,
        "misses": dict(kinds),
        "shape_twins": twins,
        "centre_correlation": [across, down],
        "probe_r2": r2,
        "twin_word_attention": attention,
    }


if __name__ == "__main__":
    main()
