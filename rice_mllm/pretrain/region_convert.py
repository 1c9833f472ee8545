"""Writers of stage-0 region data: COCO instances -> region JSONL, and region JSONL -> Parquet shards.

Formats in pretrain/region_data.py. Both check what they read and write nothing from bad input.
"""

import json
import os
from pathlib import Path

import pyarrow as pa

from rice_mllm.data.shards import IMAGE_CELL, ROWS_PER_GROUP, ROWS_PER_SHARD, ShardWriter, hf_schema, image_cell
from rice_mllm.pretrain.region_data import RegionDataError, check_region_file, read_region_jsonl, resolve_image


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


def write_region_shards(
    data_file: str | Path, out: str | Path, rows_per_shard: int = ROWS_PER_SHARD, rows_per_group: int = ROWS_PER_GROUP
) -> dict[str, int]:
    """Region JSONL -> shards in `out`: per image a row of its file's bytes (as they are) and the rest of its line.

    Returns:
        Counts: images, shards.

    Raises:
        RegionDataError: every bad record (checked first, images included); nothing is written then.
    """
    if issues := check_region_file(data_file):
        raise RegionDataError(issues)
    import datasets  # its feature metadata makes `datasets.load_dataset("parquet", ...)` show the images

    schema = hf_schema(pa.schema([("image", IMAGE_CELL), ("regions", pa.string())]), {"image": datasets.Image()})
    records = read_region_jsonl(data_file)
    with ShardWriter(out, schema, rows_per_shard, rows_per_group) as writer:
        for _, record in records:
            cell = image_cell(resolve_image(data_file, record["image"]), record["image"])
            writer.write({"image": cell, "regions": json.dumps({k: v for k, v in record.items() if k != "image"})})
    return {"images": len(records), "shards": len(writer.files)}
