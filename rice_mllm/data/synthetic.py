"""The embedded tiny world on disk: images, stage-0 region JSONL, stage-1 captions and stage-2 QA in LLaVA JSON.

`python -m rice_mllm.data.synthetic --out DIR --seed 0 --num-images N`. Invariant: the same arguments give
byte-identical files; train and held-out images come from disjoint random streams (the split name is in every seed).
"""

from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from rice_mllm.data.synthetic_regions import (
    REGION_QUESTION_TYPES,
    RegionTurn,
    grounding_turns,
    region_question_turns,
    split_turns,
)
from rice_mllm.data.synthetic_scene import (
    DEFAULT_WORLD,
    RenderedScene,
    Scene,
    WorldConfig,
    render_scene,
    sample_scene,
)
from rice_mllm.data.synthetic_text import (
    CAPTION_PROMPTS,
    Turn,
    caption,
    conversation,
    question_turns,
    supported_question_types,
    text_only_turns,
    two_image_turns,
)

SPLITS: tuple[str, ...] = ("train", "heldout")
MANIFEST = "manifest.json"
# Bumped whenever the same arguments would give different files, so that `reuse_existing` regenerates a world an older
# generator wrote instead of training on its stale text (git history has what each version changed).
GENERATOR_VERSION = 15
# Text-only and two-image records per image of the split, rounded up. Text records ask TEXT_ONLY_TURNS different
# questions each: held-out sums wanted more records, not longer ones. The held-out split holds more of both, so their
# accuracy is known to a few points. The fractions were tuned on the main job (git history has the runs).
TEXT_ONLY_FRACTION = {"train": 0.2, "heldout": 0.5}
TEXT_ONLY_TURNS = 3
TWO_IMAGE_FRACTION = {"train": 0.4, "heldout": 0.5}
# Question types that find an object by one attribute and name another. Merged training records ask them about every
# object they can: asked once or twice a record, the tiny LLM learnt one lookup direction in only some runs.
BINDING_TYPES: tuple[str, ...] = ("colour", "shape")


def split_files(split: str) -> dict[str, str]:
    """File names (relative to the output folder) written for a split: images folder, regions, captions, qa."""
    return {
        "images": f"images/{split}",
        "regions": f"regions_{split}.jsonl",
        "captions": f"captions_{split}.json",
        "qa": f"qa_{split}.json",
    }


def _rng(seed: int, split: str, *tags: object) -> random.Random:
    # String seeds go through SHA-512 in `random.seed`, so streams are stable across processes and PYTHONHASHSEED.
    return random.Random("/".join(map(str, ("rice_mllm.synthetic", seed, split, *tags))))


@dataclass
class SplitRecords:
    """Scenes of a split and the records phrased about them (no pixels: see `render_scene`)."""

    split: str
    scenes: list[Scene]
    image_paths: list[str]
    captions: list[dict] = field(default_factory=list)
    qa: list[dict] = field(default_factory=list)


def build_split(
    seed: int,
    split: str,
    num_images: int,
    config: WorldConfig = DEFAULT_WORLD,
    qa_per_image: int = 3,
    merge_qa: bool = False,
    two_image_fraction: float | None = None,
) -> SplitRecords:
    """Sample a split's scenes and phrase its caption and QA records.

    Args:
        seed: base seed; with the split name and image index it seeds every random stream.
        split: one of SPLITS; used in seeds, record ids and image paths, and picks the text-only and two-image
            fractions.
        num_images: number of scenes.
        config: scene sampler knobs.
        qa_per_image: QA records per image, each of a different question type (fewer if the scene supports fewer).
        merge_qa: write an image's QA turns and then its caption as one multi-turn record (question_type "mixed")
            instead of one record per type, and ask every question of a pair and of the BINDING_TYPES, and every
            object's grounding question. For training: the image's tokens, most of a sample, are then paid once for
            all its questions, and the caption names every object's colour, shape and place.
        two_image_fraction: two-image records per image; None: the split's TWO_IMAGE_FRACTION.

    Returns:
        The scenes, their image paths (relative to the output folder) and the records, in a fixed order:
        per-image records by image index, then text-only records, then two-image records.
    """
    if num_images < 1 or qa_per_image < 0:
        raise ValueError(f"need num_images >= 1 and qa_per_image >= 0, got {num_images}, {qa_per_image}")
    records = SplitRecords(split, [], [])
    for index in range(num_images):
        _add_image(records, seed, index, config, qa_per_image, merge_qa)
    rng = _rng(seed, split, "mixed")  # one stream for the text-only records, then the pairs
    records.qa += _text_records(split, rng, math.ceil(TEXT_ONLY_FRACTION[split] * num_images))
    if two_image_fraction is None:
        two_image_fraction = TWO_IMAGE_FRACTION[split]
    num_pairs = math.ceil(two_image_fraction * num_images) if num_images >= 2 else 0
    records.qa += _pair_records(records, rng, num_pairs, every_question=merge_qa)
    return records


def _add_image(
    records: SplitRecords, seed: int, index: int, config: WorldConfig, qa_per_image: int, merge_qa: bool
) -> None:
    """Sample image `index` and append its scene, path, caption record and QA records. Its streams are seeded by
    its index, so an image's records do not depend on the images before it."""
    split = records.split
    scene = sample_scene(_rng(seed, split, index, "scene"), config)
    path = f"{split_files(split)['images']}/{index:06d}.png"
    records.scenes.append(scene)
    records.image_paths.append(path)
    rng = _rng(seed, split, index, "text")
    prompt = rng.choice(CAPTION_PROMPTS)
    # Its own stream, so the phrasing choice leaves the questions as they were.
    caption_turn = (prompt, caption(scene, shape_first=_rng(seed, split, index, "caption").random() < 0.5))
    records.captions.append(_record(f"{split}-{index:06d}-caption", path, [caption_turn]))
    turns_by_type = _question_turns_by_type(scene, rng, qa_per_image, every_binding_turn=merge_qa)
    rendered = render_scene(scene)
    # Their own stream, so the older types' records stay as they were.
    region_turns = _region_turns_by_type(scene, rendered, _rng(seed, split, index, "regions"))
    if merge_qa:
        # The caption goes last: placed first, the answers could be copied from it instead of read off the
        # image, which a held-out question (asked without a caption) does not allow. The region turns go in at
        # random places among the older ones (their own stream): held out they are asked first, so training must
        # ask them early too (always last, grounding answers stopped right after <|box_start|>).
        merged = [(*turn, ()) for turns in turns_by_type.values() for turn in turns]
        order = _rng(seed, split, index, "region-order")
        for turn in _merged_region_turns(scene, rendered, region_turns):
            merged.insert(order.randint(0, len(merged)), turn)
        merged.append((*caption_turn, ()))
        turns_by_type, region_turns = {}, {"mixed": merged}
    for kind, turns in turns_by_type.items():
        records.qa.append(_record(f"{split}-{index:06d}-{kind}", path, turns, kind))
    for kind, turns in region_turns.items():
        plain, regions = split_turns(turns)
        records.qa.append(_record(f"{split}-{index:06d}-{kind}", path, plain, kind, regions))


def _question_turns_by_type(
    scene: Scene, rng: random.Random, qa_per_image: int, every_binding_turn: bool
) -> dict[str, list[Turn]]:
    """Turns of up to `qa_per_image` different question types the scene supports, the types in random order; with
    `every_binding_turn`, every turn of the BINDING_TYPES among them."""
    kinds = supported_question_types(scene)
    chosen = rng.sample(kinds, min(qa_per_image, len(kinds)))
    return {kind: question_turns(scene, kind, rng, every_binding_turn and kind in BINDING_TYPES) for kind in chosen}


def _region_turns_by_type(scene: Scene, rendered: RenderedScene, rng: random.Random) -> dict[str, list[RegionTurn]]:
    """Turns of every region question type the scene supports."""
    turns = {kind: region_question_turns(scene, rendered, kind, rng) for kind in REGION_QUESTION_TYPES}
    return {kind: kind_turns for kind, kind_turns in turns.items() if kind_turns}


def _merged_region_turns(
    scene: Scene, rendered: RenderedScene, turns_by_type: dict[str, list[RegionTurn]]
) -> list[RegionTurn]:
    """One training record's region turns: every object's grounding turn, then the image's region and absent turns.

    Every object, as the BINDING_TYPES ask every object they can: asked about one to three objects an image, the
    main job's grounding was lower on three of four seeds (git log has the runs). A region turn may then ask about a
    box a grounding turn answered, a copy that held-out records, one question type each, never allow. The drawn
    grounding turns are left out, but drawing them keeps the region and absent turns' stream as the per-type records
    have it."""
    return grounding_turns(scene, rendered) + turns_by_type.get("region", []) + turns_by_type.get("absent", [])


def _text_records(split: str, rng: random.Random, count: int) -> list[dict]:
    """`count` records without an image, TEXT_ONLY_TURNS different questions each."""
    return [
        _record(f"{split}-text-{index:06d}", None, text_only_turns(rng, TEXT_ONLY_TURNS), "text")
        for index in range(count)
    ]


def _pair_records(records: SplitRecords, rng: random.Random, count: int, every_question: bool) -> list[dict]:
    """`count` two-image records, each about a random pair of the split's images (`two_image_turns`)."""
    # The images of a pair come from the stream that also phrases its questions, so `every_question` (which phrases
    # more) changes every pair after the first. Left as it is: drawing them from their own stream changes the
    # tokenizer's corpus, hence its ids and the encoder stage 0 trains.
    pairs = []
    for index in range(count):
        first, second = rng.sample(range(len(records.scenes)), 2)
        turns = two_image_turns(records.scenes[first], records.scenes[second], rng, every_question=every_question)
        images = [records.image_paths[first], records.image_paths[second]]
        pairs.append(_record(f"{records.split}-pair-{index:06d}", images, turns, "multi_image"))
    return pairs


def _record(
    record_id: str,
    image: str | list[str] | None,
    turns: list[Turn],
    question_type: str | None = None,
    regions: list[list[int]] | None = None,
) -> dict:
    """A LLaVA record: "image" only when it has images (a list for two), "regions" only when it has boxes (pixels, one
    per `<region>` placeholder), "question_type" for every QA record."""
    record: dict = {"id": record_id}
    if image is not None:
        record["image"] = image
    num_images = 0 if image is None else 1 if isinstance(image, str) else len(image)
    record["conversations"] = conversation(turns, num_images)
    if regions:
        record["regions"] = regions
    if question_type is not None:
        record["question_type"] = question_type
    return record


def _write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def write_split(out_dir: Path, records: SplitRecords, progress: bool = False) -> None:
    """Render a split's images as PNG and write its region JSONL, caption JSON and QA JSON under `out_dir`."""
    names = split_files(records.split)
    (out_dir / names["images"]).mkdir(parents=True, exist_ok=True)
    lines = []
    pairs = zip(records.scenes, records.image_paths, strict=True)
    for scene, path in tqdm(pairs, total=len(records.scenes), desc=records.split, disable=not progress):
        rendered = render_scene(scene)
        # No pnginfo and a fixed compression level: the bytes depend on pixels and zlib only (no timestamps).
        rendered.image.save(out_dir / path, format="PNG", compress_level=6)
        lines.append(_region_line(scene, rendered, path))
    (out_dir / names["regions"]).write_text("\n".join(lines) + "\n", encoding="utf-8")
    _write_json(out_dir / names["captions"], records.captions)
    _write_json(out_dir / names["qa"], records.qa)


def _region_line(scene: Scene, rendered: RenderedScene, path: str) -> str:
    """One image's stage-0 regions as a JSON line: each shape's box with its label, and OCR texts (RICE's OCR
    branch: a box trained towards the tokens of its text) for the word and for each shape's box, the name of its
    grid cell ("top left"). Why the cells: RICE-ViT has no absolute position embedding (2D RoPE only), so an encoder
    trained on object labels alone leaves a shape's tokens blind to where it stands. As OCR texts rather than part
    of the object labels, because cell names in the labels ("red star top left") taught the cells but then the LLM
    found objects by colour or shape less often.
    """
    boxes = list(zip(scene.objects, rendered.object_boxes, strict=True))
    objects = [{"box": list(box), "label": obj.label} for obj, box in boxes]
    word = [] if scene.word is None else [{"box": list(rendered.word_box), "text": scene.word.text}]
    cells = [{"box": list(box), "text": obj.position} for obj, box in boxes]
    return json.dumps({"image": path, "objects": objects, "ocr": word + cells})


def _arguments(
    seed: int, num_images: int, num_heldout: int, config: WorldConfig, qa_per_image: int, merge_train_qa: bool
) -> dict:
    arguments = {"seed": seed, "num_images": num_images, "num_heldout": num_heldout, "qa_per_image": qa_per_image}
    # Left out when off, so manifests written before the option existed still match. When on, it names the record
    # layout, so a world merged before the caption turn was added is regenerated rather than reused.
    return arguments | asdict(config) | ({"merge_train_qa": "qa-then-caption"} if merge_train_qa else {})


def generate(
    out_dir: str | Path,
    seed: int = 0,
    num_images: int = 256,
    num_heldout: int = 64,
    config: WorldConfig = DEFAULT_WORLD,
    qa_per_image: int = 3,
    progress: bool = False,
    merge_train_qa: bool = False,
    reuse_existing: bool = False,
) -> dict:
    """Write the tiny world: both splits, then the manifest (last, so its presence marks a complete world).

    Args:
        out_dir: output folder (created; existing files of the same names are overwritten).
        seed: base seed.
        num_images: train images.
        num_heldout: held-out images (unseen: drawn from other random streams than train).
        config: scene sampler knobs.
        qa_per_image: QA records per image.
        progress: show a tqdm bar per split.
        merge_train_qa: train QA and caption as one multi-turn record per image (`build_split`'s merge_qa);
            held-out QA stays one record per question type, so evaluation reports every type.
        reuse_existing: write nothing when `out_dir/manifest.json` records this generator version and these exact
            arguments. Not safe from several processes at once: in distributed runs call it on rank 0, then barrier.

    Returns:
        The manifest written to `out_dir/manifest.json`: {"generator", "args", "splits": {split: {"images", "regions",
        "captions", "qa", "num_images", "num_qa"}}}, file names relative to `out_dir`.
    """
    out = Path(out_dir)
    arguments = _arguments(seed, num_images, num_heldout, config, qa_per_image, merge_train_qa)
    if reuse_existing and (out / MANIFEST).is_file():
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("version") == GENERATOR_VERSION and manifest.get("args") == arguments:
            return manifest
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # an interrupted run must not leave a manifest vouching for old files
    manifest: dict = {"generator": __name__, "version": GENERATOR_VERSION, "args": arguments, "splits": {}}
    for split, count in zip(SPLITS, (num_images, num_heldout), strict=True):
        records = build_split(seed, split, count, config, qa_per_image, merge_qa=merge_train_qa and split == "train")
        write_split(out, records, progress)
        manifest["splits"][split] = {**split_files(split), "num_images": count, "num_qa": len(records.qa)}
    _write_json(out / MANIFEST, manifest)
    return manifest


def main(argv: list[str] | None = None) -> dict:
    """CLI: generate the tiny world into --out."""
    parser = argparse.ArgumentParser(prog="python -m rice_mllm.data.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-images", type=int, default=256, help="train images")
    parser.add_argument("--num-heldout", type=int, default=64, help="held-out (unseen) images")
    parser.add_argument("--qa-per-image", type=int, default=3)
    parser.add_argument("--min-side", type=int, default=DEFAULT_WORLD.min_side)
    parser.add_argument("--max-side", type=int, default=DEFAULT_WORLD.max_side)
    parser.add_argument("--max-objects", type=int, default=DEFAULT_WORLD.max_objects)
    parser.add_argument("--word-prob", type=float, default=DEFAULT_WORLD.word_prob)
    parser.add_argument("--word-grid", type=int, default=DEFAULT_WORLD.word_grid, help="typeset words on this grid")
    parser.add_argument("--word-size", type=int, default=DEFAULT_WORLD.word_size, help="font size of typeset words")
    parser.add_argument(
        "--merge-train-qa", action="store_true", help="one multi-turn record (QA, then caption) per train image"
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    config = WorldConfig(args.min_side, args.max_side, args.max_objects, args.word_prob, args.word_grid, args.word_size)
    manifest = generate(
        args.out,
        args.seed,
        args.num_images,
        args.num_heldout,
        config,
        args.qa_per_image,
        not args.no_progress,
        args.merge_train_qa,
    )
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['num_images']} images, {info['num_qa']} QA records -> {args.out}")
    return manifest


if __name__ == "__main__":
    main()
