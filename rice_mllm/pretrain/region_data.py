"""Stage-0 region data: the region JSONL format, its shards, its checker, the torch Dataset + collate, a CLI.

One image per line: {"image": path, "objects": [{"box": [x0,y0,x1,y1], "label"?, "cluster"?}],
"ocr": [{"box", "text", "tokens"?}]}; boxes xyxy in pixels of the original image; paths relative to the file's folder.
Shards (data/shards.py) hold one image per row: `image` (its file's bytes) and `regions` (the rest of the JSONL line,
as JSON text: regions' optional keys stay absent, where Arrow structs would turn them into nulls).
"""

import argparse
import hashlib
import io
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rice_mllm.constants import CLIP_MEAN, CLIP_STD
from rice_mllm.data.shards import ROWS_PER_GROUP, ROWS_PER_SHARD, ShardRows, cell_image, is_shards
from rice_mllm.data.sources import EncodedImage

logger = logging.getLogger(__name__)

OBJECT, OCR = 0, 1  # region kinds in batches


@dataclass(frozen=True)
class RegionIssue:
    """One problem of one record: where it is (JSONL line from 1, or .parquet shard row from 0) and what is wrong."""

    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file} row {self.line}" if self.file.endswith(".parquet") else f"{self.file}:{self.line}"
        return f"{where}: {self.field}: {self.message}"


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


REGION_COLUMNS = ["image", "regions"]
RegionImage = Path | EncodedImage  # a file, or a shard's bytes


def _shard_record(row: dict, file: Path, index: int) -> tuple[dict, RegionImage | None]:
    """A shard row -> (the record as in the JSONL, "image" naming the cell; its image, None when not read)."""
    try:
        record = json.loads(row["regions"])
        image = cell_image(row["image"], f"{file} row {index}", file.parent) if "image" in row else None
    except (TypeError, ValueError) as err:  # bad JSON text, or an image cell with neither bytes nor path
        raise RegionDataError([RegionIssue(str(file), index, "regions/image", str(err))]) from err
    name = row["image"].get("path") if isinstance(row.get("image"), dict) else None
    return ({**record, "image": name or "embedded bytes"} if isinstance(record, dict) else record), image


def iter_region_records(path: str | Path, images: bool = False) -> Iterator[tuple[str, int, dict, RegionImage | None]]:
    """(file, line or row, record, image) of a region JSONL or of region shards, in order; image None unless `images`
    (shards then read only their `regions` column). Raises RegionDataError on bad JSON, which ends the reading."""
    if not is_shards(path):
        for line, record in read_region_jsonl(path):
            image = record.get("image") if isinstance(record, dict) else None
            usable = images and isinstance(image, str) and image
            yield str(path), line, record, resolve_image(path, image) if usable else None
        return
    rows = ShardRows(path, columns=None if images else ["regions"], required=REGION_COLUMNS)
    for index, row in enumerate(rows):
        file, number = rows.locate(index)
        yield str(file), number, *_shard_record(row, file, number)


def _open_image(image: RegionImage) -> tuple[Path | io.BytesIO, str]:
    """What PIL opens for an image file or cell, and its name for errors."""
    if isinstance(image, EncodedImage):
        return io.BytesIO(image.data), image.name or "embedded bytes"
    return image, str(image)


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
    """Every problem of a region JSONL or of region shards (bad JSON, missing/unreadable image, bad boxes, empty text,
    missing labels).

    Args:
        path: the JSONL file, or a .parquet shard or folder of them.
        check_images: open each image header to test existence and box bounds.
        require_labels: objects need "cluster" and OCR regions "tokens" (training input).
    """
    issues = []
    try:
        for file, line, record, image in iter_region_records(path, check_images):
            size = None
            if image is not None:
                opened, name = _open_image(image)
                try:
                    with Image.open(opened) as handle:
                        size = handle.size
                except (OSError, ValueError) as err:
                    issues.append(RegionIssue(file, line, "image", f"cannot open {name}: {err}"))
            issues.extend(check_record(record, file, line, size, require_labels))
    except RegionDataError as err:
        issues.extend(err.issues)
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
    path: str | Path | io.BytesIO,
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
    """Region JSONL or region shards -> one sample per image with exactly `num_regions` regions.

    Regions (objects then OCR) are drawn without replacement when there are more than N; when fewer, all are kept
    and the rest drawn with replacement. Draws depend only on (seed, epoch, index): reproducible in any worker, and
    equal for a JSONL and the shards written from it.

    Args:
        path: a region JSONL whose objects carry "cluster" and OCR regions "tokens" (validated at construction), or
            shards of one (a .parquet file or folder; read lazily, each record checked when its sample is read: check
            them first with `python -m rice_mllm.pretrain.region_data check --require-labels`).
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
        if max_patches is not None and (patch_size is None or max_patches < 1):
            raise ValueError(f"max_patches={max_patches} needs a patch_size and at least one patch")
        self.path, self.image_size, self.num_regions, self.max_tokens = Path(path), image_size, num_regions, max_tokens
        self.max_patches, self.patch_size = max_patches, patch_size
        self.seed, self.epoch = seed, 0
        self.rows = ShardRows(path, required=REGION_COLUMNS) if is_shards(path) else None
        self.records = None
        if self.rows is None:
            if issues := check_region_file(path, check_images=False, require_labels=True):
                raise RegionDataError(issues)
            self.records = read_region_jsonl(path)

    def set_epoch(self, epoch: int) -> None:
        """Draw different regions in each epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records) if self.rows is None else len(self.rows)

    def _record(self, index: int) -> tuple[str, int, dict, RegionImage]:
        """(file, line or row, record, image) of sample `index`."""
        if self.rows is None:
            line, record = self.records[index]
            return str(self.path), line, record, resolve_image(self.path, record["image"])
        file, row = self.rows.locate(index)
        return str(file), row, *_shard_record(self.rows[index], file, row)

    def _labels(self, kind: int, region: dict) -> list[int]:
        if kind == OBJECT:
            return [region["cluster"]] + [-1] * (self.max_tokens - 1)
        tokens = list(dict.fromkeys(region["tokens"]))[: self.max_tokens]  # distinct, in text order
        return tokens + [-1] * (self.max_tokens - len(tokens))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        file, line, record, image = self._record(index)
        opened, name = _open_image(image)
        try:
            pixels, (width, height) = load_region_image(opened, self.image_size, self.patch_size, self.max_patches)
        except (OSError, ValueError) as err:
            raise RegionDataError([RegionIssue(file, line, "image", f"cannot open {name}: {err}")]) from err
        # Bounds need the image size, which a JSONL's construction-time validation (no image I/O) did not have.
        if issues := check_record(record, file, line, (width, height), require_labels=True):
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


def main(argv: list[str] | None = None) -> int:
    """`convert-coco`, `to-shards` and `check` commands; returns the exit status (1 when `check` finds problems)."""
    parser = argparse.ArgumentParser(prog="python -m rice_mllm.pretrain.region_data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert-coco", help="COCO instances JSON -> region JSONL")
    convert.add_argument("--instances", required=True, help="COCO instances_*.json")
    convert.add_argument("--images", required=True, help="folder holding the images' file_name paths")
    convert.add_argument("--out", required=True, help="region JSONL to write")
    convert.add_argument("--keep-crowd", action="store_true", help="keep iscrowd boxes")
    convert.add_argument("--min-edge", type=float, default=0.0, help="drop boxes with a shorter side (paper: 128 px)")
    convert.add_argument("--shards", help="also write the JSONL as shards into this folder (see to-shards)")
    to_shards = commands.add_parser("to-shards", help="region JSONL + its images -> Parquet shards with the bytes")
    to_shards.add_argument("--data", required=True, help="region JSONL")
    to_shards.add_argument("--out", dest="shards", required=True, help="an empty (or new) folder for the shards")
    for command in (convert, to_shards):
        command.add_argument("--rows-per-shard", type=int, default=ROWS_PER_SHARD)
        command.add_argument("--rows-per-group", type=int, default=ROWS_PER_GROUP, help="rows a random read decodes")
    check = commands.add_parser("check", help="report every bad record of region JSONL files or shards")
    check.add_argument("files", nargs="+", help="region JSONL files, .parquet shards or folders of them")
    check.add_argument("--no-images", action="store_true", help="skip opening images (no existence/bounds check)")
    check.add_argument("--require-labels", action="store_true", help="objects need 'cluster', OCR needs 'tokens'")
    args = parser.parse_args(argv)
    from rice_mllm.pretrain.region_convert import convert_coco, write_region_shards  # (it imports this module)

    if args.command == "convert-coco":
        counts = convert_coco(args.instances, args.images, args.out, args.keep_crowd, args.min_edge)
        print(f"wrote {args.out}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    if args.command in ("convert-coco", "to-shards") and args.shards:
        data = args.out if args.command == "convert-coco" else args.data
        counts = write_region_shards(data, args.shards, args.rows_per_shard, args.rows_per_group)
        print(f"wrote {args.shards}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    if args.command != "check":
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
