"""Conversations in Parquet shards, LLaVA-OneVision's public layout: `image` (a {"bytes", "path"} struct, a list of
them, or plain bytes), `conversations` [{"from", "value"}], optional `regions` (a list<list<number>> column of pixel
boxes, null: none), other columns (e.g. `id`) kept as metadata. Columns beside image and conversations are written as
the records hold them, their types inferred over all records.

Rows read lazily through data/shards.py, images decoded from their bytes per sample (never unpacked to files).
Invariant: shards written from a LLaVA file give the Conversations of that file (images as bytes instead of paths).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from rice_mllm.data.shards import (
    IMAGE_CELL,
    ROWS_PER_GROUP,
    ROWS_PER_SHARD,
    ShardRows,
    ShardWriter,
    cell_image,
    hf_schema,
    image_cell,
    is_shards,
    rechunk_shards,
)
from rice_mllm.data.sources import (
    Conversation,
    DataFormatError,
    MissingImageError,
    conversation_from_raw,
    iter_raw_records,
    parse_record,
)

TURN = pa.struct([("from", pa.string()), ("value", pa.string())])


def conversation_from_row(row: dict, file: Path, index: int, image_root: Path | None) -> Conversation:
    """A shard row -> Conversation named `file row index`; image cells without bytes resolve against `image_root`
    (default: the shard's folder). Null columns are absent fields. Raises DataFormatError naming the row."""
    where = f"{file} row {index}"
    cells = row.get("image")
    cells = cells if isinstance(cells, list) else [] if cells is None else [cells]
    root = file.parent if image_root is None else image_root
    record = {key: value for key, value in row.items() if value is not None}
    record["image"] = [cell_image(cell, f"{where}: image {i}", root) for i, cell in enumerate(cells)]
    return parse_record(record, str(file), index, root, unit="row")


class ConversationShards(Sequence):
    """The Conversations of Parquet shards, parsed one row at a time when asked for (a lazy `Sequence`).

    Args:
        path: a .parquet file or a folder of them.
        image_folder: where image cells holding only a path are looked up (default: each shard's folder).
    """

    def __init__(self, path: str | Path, image_folder: str | Path | None = None) -> None:
        self.rows = ShardRows(path, required=["conversations"])  # a wrong layout is refused before training starts
        self.image_root = None if image_folder is None else Path(image_folder)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Conversation:
        file, row = self.rows.locate(index)
        return conversation_from_row(self.rows[index], file, row, self.image_root)


def _columns(records: list[dict], path: Path) -> dict[str, pa.DataType]:
    """Arrow types of the fields beside image and conversations, inferred over every record (absent: null)."""
    names = list(dict.fromkeys(key for record in records for key in record if key not in ("image", "conversations")))
    types = {}
    for name in names:
        try:
            types[name] = pa.array([record.get(name) for record in records]).type
        except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
            raise DataFormatError(f"{path}: field {name!r} holds values of several types: {error}") from error
    return types


def write_conversation_shards(
    data_file: str | Path,
    out: str | Path,
    image_folder: str | Path | None = None,
    rows_per_shard: int = ROWS_PER_SHARD,
    rows_per_group: int = ROWS_PER_GROUP,
) -> dict[str, int]:
    """LLaVA .json / .jsonl + its images -> Parquet shards in `out` with every image's bytes embedded as they are.

    `image` is one struct per row when no record has several images (LLaVA-OneVision's layout), else a list.

    Returns:
        Counts: records, images, shards.

    Raises:
        DataFormatError / MissingImageError: naming the record, before anything is left in `out`.
    """
    data_file = Path(data_file)
    root = data_file.parent if image_folder is None else Path(image_folder)
    records, conversations = [], []
    for raw in iter_raw_records(data_file):
        conversations.append(conversation_from_raw(raw, data_file, root))
        records.append(raw.value)
        for i, image in enumerate(conversations[-1].images):
            if not image.is_file():
                raise MissingImageError(f"{conversations[-1].location}: image {i} {image}: file not found")
    several = any(len(c.images) > 1 for c in conversations)
    extras = _columns(records, data_file)
    fields = [(name, kind) for name, kind in extras.items() if name == "id"]
    fields += [("image", pa.list_(IMAGE_CELL) if several else IMAGE_CELL), ("conversations", pa.list_(TURN))]
    fields += [(name, kind) for name, kind in extras.items() if name != "id"]
    import datasets  # its feature metadata makes `datasets.load_dataset("parquet", ...)` show the images

    schema = hf_schema(pa.schema(fields), {"image": datasets.List(datasets.Image()) if several else datasets.Image()})
    with ShardWriter(out, schema, rows_per_shard, rows_per_group) as writer:
        for record, conversation in zip(records, conversations, strict=True):
            names = record.get("image") or []
            names = [names] if isinstance(names, str) else names
            cells = [image_cell(path, name) for path, name in zip(conversation.images, names, strict=True)]
            turns = [{"from": turn["from"], "value": turn["value"]} for turn in record["conversations"]]
            row = {**record, "conversations": turns, "image": cells if several else (cells or [None])[0]}
            writer.write(row)
    return {"records": len(records), "images": sum(len(c.images) for c in conversations), "shards": len(writer.files)}


def add_to_shards_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data_file", help="a LLaVA .json / .jsonl file, or shards to rewrite in small row groups")
    parser.add_argument("--out", required=True, help="an empty (or new) folder for the shards")
    parser.add_argument("--image-folder", help="relative image paths resolve here (default: the data file's folder)")
    parser.add_argument("--rows-per-shard", type=int, default=ROWS_PER_SHARD)
    parser.add_argument("--rows-per-group", type=int, default=ROWS_PER_GROUP, help="rows a random read decodes")


def run_to_shards(args: argparse.Namespace) -> int:
    if is_shards(args.data_file):
        ConversationShards(args.data_file)  # refuses shards of another layout
        counts = rechunk_shards(args.data_file, args.out, args.rows_per_shard, args.rows_per_group)
    else:
        counts = write_conversation_shards(
            args.data_file, args.out, args.image_folder, args.rows_per_shard, args.rows_per_group
        )
    print(f"wrote {args.out}: " + ", ".join(f"{key}={value}" for key, value in counts.items()))
    return 0
