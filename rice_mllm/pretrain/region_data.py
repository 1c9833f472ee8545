"""Stage-0 region data: the region JSONL format, its checker, a COCO converter, and the torch Dataset + collate.

One image per line: {"image": path, "objects": [{"box": [x0,y0,x1,y1], "label"?, "cluster"?}],
"ocr": [{"box", "text", "tokens"?}]}; boxes xyxy in pixels of the original image; paths relative to the file's folder.
"""

import argparse
import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rice_mllm.constants import CLIP_MEAN, CLIP_STD

logger = logging.getLogger(__name__)

OBJECT, OCR = 0, 1  # region kinds in batches


@dataclass(frozen=True)
class RegionIssue:
    """One problem of one record: where it is and what is wrong."""

    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.message}"


class RegionDataError(ValueError):
    """A region file failed validation; `issues` lists every problem found."""

    def __init__(self, issues: list[RegionIssue], limit: int = 20) -> None:
        self.issues = issues
        shown = "\n".join(str(i) for i in issues[:limit])
        more = f"\n... and {len(issues) - limit} more" if len(issues) > limit else ""
        super().__init__(f"{len(issues)} problem(s) in region data:\n{shown}{more}")


def read_region_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(1-based line number, record) for every non-blank line; raises RegionDataError on bad JSON lines."""
    records, issues = [], []
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                records.append((number, json.loads(text)))
            except json.JSONDecodeError as err:
                issues.append(RegionIssue(str(path), number, "json", str(err)))
    if issues:
        raise RegionDataError(issues)
    return records


def resolve_image(data_file: str | Path, image: str) -> Path:
    """An image path from a record, relative to the data file's folder unless absolute."""
    return Path(image) if os.path.isabs(image) else Path(data_file).parent / image


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_index(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _box_problem(box: object, size: tuple[int, int] | None) -> str | None:
    if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
        return f"must be 4 finite numbers [x0, y0, x1, y1], got {box!r}"
    x0, y0, x1, y1 = box
    if not (x0 < x1 and y0 < y1):
        return f"degenerate box {box} (needs x0 < x1 and y0 < y1)"
    if size is not None and (x0 < 0 or y0 < 0 or x1 > size[0] or y1 > size[1]):
        return f"box {box} outside the {size[0]}x{size[1]} image"
    return None


def _label_problem(key: str, value: object) -> str | None:
    if key == "cluster" and not _is_index(value):
        return f"must be a cluster id >= 0, got {value!r}"
    if key == "tokens" and not (isinstance(value, list) and value and all(_is_index(t) for t in value)):
        return f"must be a non-empty list of token ids >= 0, got {value!r}"
    return None


def check_record(
    record: object, file: str, line: int, size: tuple[int, int] | None, require_labels: bool
) -> list[RegionIssue]:
    """Problems of one parsed record; `size` is the image's (width, height) when known."""
    if not isinstance(record, dict):
        return [RegionIssue(file, line, "record", f"must be a JSON object, got {type(record).__name__}")]
    issues = []

    def bad(field: str, message: str) -> None:
        issues.append(RegionIssue(file, line, field, message))

    if not isinstance(record.get("image"), str) or not record.get("image"):
        bad("image", f"must be a non-empty path string, got {record.get('image')!r}")
    count = 0
    for kind, label_key in (("objects", "cluster"), ("ocr", "tokens")):
        regions = record.get(kind, [])
        if not isinstance(regions, list):
            bad(kind, f"must be a list, got {type(regions).__name__}")
            continue
        count += len(regions)
        for i, region in enumerate(regions):
            where = f"{kind}[{i}]"
            if not isinstance(region, dict):
                bad(where, f"must be an object, got {region!r}")
                continue
            if (problem := _box_problem(region.get("box"), size)) is not None:
                bad(f"{where}.box", problem)
            if kind == "objects" and "label" in region and not (isinstance(region["label"], str) and region["label"]):
                bad(f"{where}.label", f"must be a non-empty string, got {region['label']!r}")
            if kind == "ocr" and not (isinstance(region.get("text"), str) and region["text"].strip()):
                bad(f"{where}.text", f"must be non-empty text, got {region.get('text')!r}")
            if label_key in region and (problem := _label_problem(label_key, region[label_key])) is not None:
                bad(f"{where}.{label_key}", problem)
            if require_labels and label_key not in region:
                bad(f"{where}.{label_key}", "missing: run `python -m rice_mllm.pretrain.clusters` first")
    if count == 0:
        bad("objects/ocr", "record has no regions")
    return issues


def check_region_file(path: str | Path, check_images: bool = True, require_labels: bool = False) -> list[RegionIssue]:
    """Every problem of a region JSONL (bad JSON, missing/unreadable image, bad boxes, empty text, missing labels).

    Args:
        path: the JSONL file.
        check_images: open each image header to test existence and box bounds.
        require_labels: objects need "cluster" and OCR regions "tokens" (training input).
    """
    try:
        records = read_region_jsonl(path)
    except RegionDataError as err:
        return err.issues
    issues = []
    for line, record in records:
        size = None
        if check_images and isinstance(record, dict) and isinstance(record.get("image"), str) and record["image"]:
            image_path = resolve_image(path, record["image"])
            try:
                with Image.open(image_path) as image:
                    size = image.size
            except (OSError, ValueError) as err:
                issues.append(RegionIssue(str(path), line, "image", f"cannot open {image_path}: {err}"))
        issues.extend(check_record(record, str(path), line, size, require_labels))
    return issues


def patch_budget_size(width: int, height: int, patch_size: int, max_patches: int) -> tuple[int, int]:
    """(height, width) in pixels, multiples of the patch, keeping the aspect ratio with at most `max_patches` patches.

    The image is scaled (up or down) so its patch grid fills the budget, as LLaVA-OneVision-1.5 feeds RICE; each
    side keeps at least one patch, the other side then shrinks so the product stays within the budget.
    """
    scale = math.sqrt(max_patches * patch_size**2 / (width * height))
    rows = max(1, math.floor(height * scale / patch_size))
    cols = max(1, min(math.floor(width * scale / patch_size), max_patches // rows))
    rows = min(rows, max_patches // cols)
    return rows * patch_size, cols * patch_size


def load_region_image(
    path: str | Path,
    image_size: int,
    patch_size: int | None = None,
    max_patches: int | None = None,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """RGB image -> bicubic resize -> normalised [3, H, W] (CLIP's statistics by default); also the original
    (width, height).

    Square image_size x image_size (the paper's input) unless `max_patches` is set: then `patch_budget_size`.
    """
    with Image.open(path) as image:
        size = image.size
        if max_patches is None:
            height, width = image_size, image_size
        else:
            height, width = patch_budget_size(*size, patch_size, max_patches)
        resized = image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)  # [3, H, W]
    return (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None], size


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    # Stable across processes and Python versions (unlike hash()), so workers and resumes draw the same regions.
    return int.from_bytes(hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest(), "little") >> 1


class RegionDataset(torch.utils.data.Dataset):
    """Region JSONL -> one sample per image with exactly `num_regions` regions.

    Regions (objects then OCR) are drawn without replacement when there are more than N; when fewer, all are kept
    and the rest drawn with replacement. Draws depend only on (seed, epoch, index): reproducible in any worker.

    Args:
        path: a region JSONL whose objects carry "cluster" and OCR regions "tokens" (validated at construction).
        image_size: S, the encoder's square input size.
        num_regions: N regions per image.
        max_tokens: P, token positives kept per OCR region (first P distinct tokens).
        seed: sampling seed.
        max_patches: keep each image's aspect ratio within this many patches of `patch_size` instead of squashing
            it to S x S.
    """

    def __init__(
        self,
        path: str | Path,
        image_size: int,
        num_regions: int = 10,
        max_tokens: int = 10,
        seed: int = 0,
        max_patches: int | None = None,
        patch_size: int | None = None,
    ) -> None:
        issues = check_region_file(path, check_images=False, require_labels=True)
        if issues:
            raise RegionDataError(issues)
        if max_patches is not None and (patch_size is None or max_patches < 1):
            raise ValueError(f"max_patches={max_patches} needs a patch_size and at least one patch")
        self.path, self.image_size, self.num_regions, self.max_tokens = Path(path), image_size, num_regions, max_tokens
        self.max_patches, self.patch_size = max_patches, patch_size
        self.seed, self.epoch = seed, 0
        self.records = read_region_jsonl(path)

    def set_epoch(self, epoch: int) -> None:
        """Draw different regions in each epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def _labels(self, kind: int, region: dict) -> list[int]:
        if kind == OBJECT:
            return [region["cluster"]] + [-1] * (self.max_tokens - 1)
        tokens = list(dict.fromkeys(region["tokens"]))[: self.max_tokens]  # distinct, in text order
        return tokens + [-1] * (self.max_tokens - len(tokens))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        line, record = self.records[index]
        image_path = resolve_image(self.path, record["image"])
        try:
            pixels, (width, height) = load_region_image(image_path, self.image_size, self.patch_size, self.max_patches)
        except (OSError, ValueError) as err:
            raise RegionDataError(
                [RegionIssue(str(self.path), line, "image", f"cannot open {image_path}: {err}")]
            ) from err
        # Bounds need the image size, which construction-time validation (no image I/O) did not have.
        issues = [
            RegionIssue(str(self.path), line, f"{kind}[{i}].box", problem)
            for kind in ("objects", "ocr")
            for i, region in enumerate(record.get(kind, []))
            if (problem := _box_problem(region["box"], (width, height))) is not None
        ]
        if issues:
            raise RegionDataError(issues)
        regions = [(OBJECT, r) for r in record.get("objects", [])] + [(OCR, r) for r in record.get("ocr", [])]
        generator = torch.Generator().manual_seed(_sample_seed(self.seed, self.epoch, index))
        n = self.num_regions
        if len(regions) >= n:
            picks = torch.randperm(len(regions), generator=generator)[:n]
        else:
            extra = torch.randint(len(regions), (n - len(regions),), generator=generator)
            picks = torch.cat([torch.arange(len(regions)), extra])
        chosen = [regions[i] for i in picks.tolist()]
        scale = torch.tensor([pixels.shape[2] / width, pixels.shape[1] / height] * 2)
        boxes = torch.tensor([r["box"] for _, r in chosen], dtype=torch.float32) * scale  # [N, 4]
        labels = torch.tensor([self._labels(kind, r) for kind, r in chosen], dtype=torch.long)  # [N, P]
        return {
            "pixel_values": pixels,
            "boxes": boxes,
            "kinds": torch.tensor([kind for kind, _ in chosen], dtype=torch.long),
            "labels": labels,
            "valid": labels[:, 0] >= 0,
        }


def collate_regions(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack samples: pixel_values [B,3,H,W] (images of other sizes top-left, zero-padded), image_sizes [B,2]
    (height, width), boxes [B,N,4], kinds [B,N] (OBJECT/OCR), labels [B,N,P], valid [B,N]."""
    sizes = torch.tensor([s["pixel_values"].shape[1:] for s in samples])  # [B, 2]
    height, width = sizes.max(dim=0).values.tolist()
    pixels = samples[0]["pixel_values"].new_zeros(len(samples), 3, height, width)
    for image, sample in zip(pixels, samples, strict=True):
        image[:, : sample["pixel_values"].shape[1], : sample["pixel_values"].shape[2]] = sample["pixel_values"]
    batch = {key: torch.stack([s[key] for s in samples]) for key in ("boxes", "kinds", "labels", "valid")}
    return {"pixel_values": pixels, "image_sizes": sizes, **batch}


def convert_coco(
    instances: str | Path, image_dir: str | Path, out: str | Path, keep_crowd: bool = False, min_edge: float = 0.0
) -> dict:
    """COCO instances JSON (bbox [x, y, w, h], category names) -> region JSONL with "label" = category name.

    Boxes are clipped to the image; crowd boxes (unless keep_crowd), boxes degenerate after clipping, boxes whose
    shorter side is under `min_edge` pixels (the paper keeps regions of 128 px and more) and images left with no box
    are not written, and counted in the returned dict. Image paths are written relative to `out`.

    Returns:
        Counts: images, objects, crowd, degenerate, small, images_without_boxes.
    """
    with open(instances, encoding="utf-8") as f:
        coco = json.load(f)
    for key in ("images", "annotations", "categories"):
        if key not in coco:
            raise KeyError(f"{instances}: COCO instances need a {key!r} list, found keys {sorted(coco)}")
    categories = {c["id"]: c["name"] for c in coco["categories"]}
    images = {im["id"]: im for im in coco["images"]}
    boxes: dict[int, list[dict]] = {i: [] for i in images}
    counts = {"images": 0, "objects": 0, "crowd": 0, "degenerate": 0, "small": 0, "images_without_boxes": 0}
    for ann in coco["annotations"]:
        if ann["image_id"] not in images or ann["category_id"] not in categories:
            raise KeyError(
                f"{instances}: annotation {ann.get('id')} refers to image_id {ann['image_id']} / "
                f"category_id {ann['category_id']}, not listed"
            )
        if ann.get("iscrowd", 0) and not keep_crowd:
            counts["crowd"] += 1
            continue
        image = images[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        box = [max(0.0, x), max(0.0, y), min(float(image["width"]), x + w), min(float(image["height"]), y + h)]
        if not (box[0] < box[2] and box[1] < box[3]):
            counts["degenerate"] += 1
            continue
        if min(box[2] - box[0], box[3] - box[1]) < min_edge:
            counts["small"] += 1
            continue
        boxes[ann["image_id"]].append({"box": [round(v, 2) for v in box], "label": categories[ann["category_id"]]})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for image_id, image in images.items():
            if not boxes[image_id]:
                counts["images_without_boxes"] += 1
                continue
            path = os.path.relpath(Path(image_dir).resolve() / image["file_name"], out.parent.resolve())
            f.write(json.dumps({"image": path, "objects": boxes[image_id], "ocr": []}) + "\n")
            counts["images"] += 1
            counts["objects"] += len(boxes[image_id])
    return counts


def main(argv: list[str] | None = None) -> int:
    """`convert-coco` and `check` commands; returns the exit status (1 when `check` finds problems)."""
    parser = argparse.ArgumentParser(prog="python -m rice_mllm.pretrain.region_data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert-coco", help="COCO instances JSON -> region JSONL")
    convert.add_argument("--instances", required=True, help="COCO instances_*.json")
    convert.add_argument("--images", required=True, help="folder holding the images' file_name paths")
    convert.add_argument("--out", required=True, help="region JSONL to write")
    convert.add_argument("--keep-crowd", action="store_true", help="keep iscrowd boxes")
    convert.add_argument("--min-edge", type=float, default=0.0, help="drop boxes with a shorter side (paper: 128 px)")
    check = commands.add_parser("check", help="report every bad record of region JSONL files")
    check.add_argument("files", nargs="+")
    check.add_argument("--no-images", action="store_true", help="skip opening images (no existence/bounds check)")
    check.add_argument("--require-labels", action="store_true", help="objects need 'cluster', OCR needs 'tokens'")
    args = parser.parse_args(argv)
    if args.command == "convert-coco":
        counts = convert_coco(args.instances, args.images, args.out, args.keep_crowd, args.min_edge)
        print(f"wrote {args.out}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
        return 0
    total = 0
    for file in args.files:
        issues = check_region_file(file, check_images=not args.no_images, require_labels=args.require_labels)
        for issue in issues:
            print(issue)
        print(f"{file}: {len(issues)} problem(s)")
        total += len(issues)
    return 1 if total else 0


if __name__ == "__main__":
    raise SystemExit(main())
