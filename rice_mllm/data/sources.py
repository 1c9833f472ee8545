"""Conversation records from LLaVA JSON / JSONL files and Hugging Face datasets.

LLaVA schema: {"id", "image": str | [str], "conversations": [{"from": "human"|"gpt"|"system", "value"}], ...};
image paths are relative to the data file's folder (Parquet shards hold encoded bytes instead: data/shards.py).
Optional "regions": [[x0, y0, x1, y1], ...] pixel boxes, one `<region>` placeholder per box in the turns (mllm/boxes.py
says which image each refers to); only their shape is checked here, the rest where the images' sizes are known.
Invariant: every error names the file, record (or shard row) and field.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image

from rice_mllm.mllm.boxes import RegionError, fill_regions, is_box

T = TypeVar("T")

# LLaVA speaker names -> chat roles; role names themselves are accepted too (ShareGPT-style exports).
SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataFormatError(ValueError):
    """A record does not follow the LLaVA conversation schema."""


class ImageLoadError(OSError):
    """An image of a record cannot be used."""


class MissingImageError(ImageLoadError):
    """The image file does not exist."""


class CorruptImageError(ImageLoadError):
    """The image file exists but cannot be decoded."""


@dataclass(frozen=True)
class EncodedImage:
    """An image held as its encoded file bytes (a Parquet cell), decoded only when opened; `name` tells errors which."""

    data: bytes = field(repr=False)
    name: str = ""


ImageSource = Path | Image.Image | EncodedImage


@dataclass
class Conversation:
    """One training sample.

    Attributes:
        messages: [{"role": "system"|"user"|"assistant", "content": str}].
        images: resolved paths, decoded images (a HF dataset's pixels) or encoded bytes (a Parquet shard's cells).
        source: data file (or dataset name, or shard) the record came from.
        index: 0-based record index in the source.
        metadata: every other field of the record (e.g. "id", "question_type").
        unit: what `index` counts in errors: "record", or "row" of a Parquet shard.
        regions: pixel boxes [x0, y0, x1, y1] of the `<region>` placeholders, in order (the processor's `regions`).
    """

    messages: list[dict[str, str]]
    images: list[ImageSource]
    source: str
    index: int
    metadata: dict[str, Any] = field(default_factory=dict)
    unit: str = "record"
    regions: list[list[float]] = field(default_factory=list)

    @property
    def location(self) -> str:
        return f"{self.source} {self.unit} {self.index}"


def parse_record(record: Any, source: str, index: int, image_root: Path | None, unit: str = "record") -> Conversation:
    """Turn one raw LLaVA record into a Conversation; raises DataFormatError naming the field.

    `image` holds paths (relative to `image_root`), or images already in memory (PIL, EncodedImage, resolved Path).
    """
    where = f"{source} {unit} {index}"
    if not isinstance(record, dict):
        raise DataFormatError(f"{where}: expected an object, got {type(record).__name__}")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataFormatError(f"{where}: 'conversations' must be a non-empty list, got {turns!r:.80}")
    messages = []
    for turn_index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataFormatError(f"{where}: conversations[{turn_index}] must be an object")
        speaker, value = turn.get("from"), turn.get("value")
        if speaker not in SPEAKERS:
            raise DataFormatError(
                f"{where}: conversations[{turn_index}].from is {speaker!r}, expected one of {sorted(SPEAKERS)}"
            )
        if not isinstance(value, str):
            raise DataFormatError(f"{where}: conversations[{turn_index}].value must be a string, got {value!r:.80}")
        messages.append({"role": SPEAKERS[speaker], "content": value})
    images = record.get("image")
    kinds = (str, Path, Image.Image, EncodedImage)
    if images is None:
        images = []
    elif isinstance(images, kinds):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(image, kinds) for image in images):
        raise DataFormatError(f"{where}: 'image' must be a path, a list of paths or absent, got {images!r:.80}")
    resolved = [_resolve(image, image_root) if isinstance(image, str) else image for image in images]
    regions = _parse_regions(record.get("regions"), where)
    metadata = {key: value for key, value in record.items() if key not in ("conversations", "image", "regions")}
    return Conversation(messages, resolved, source, index, metadata, unit, regions)


def _parse_regions(regions: Any, where: str) -> list[list[float]]:
    """A record's "regions" (absent or null: none) as lists, refused by name unless a list of 4-number lists."""
    if regions is None:
        return []
    if not isinstance(regions, list):
        raise DataFormatError(f"{where}: 'regions' must be a list of [x0, y0, x1, y1] pixel boxes, got {regions!r:.80}")
    for region_index, box in enumerate(regions):
        if not is_box(box):
            raise DataFormatError(
                f"{where}: regions[{region_index}] must be 4 numbers [x0, y0, x1, y1], got {box!r:.80}"
            )
    return [list(box) for box in regions]


def _resolve(path: str, image_root: Path | None) -> Path:
    path = Path(path)
    return path if path.is_absolute() or image_root is None else image_root / path


@dataclass(frozen=True)
class RawRecord:
    """One undecoded record: its index and JSON value, or the decoding error (a bad JSONL line)."""

    index: int
    value: Any = None
    error: str | None = None


def iter_raw_records(path: str | Path) -> Iterator[RawRecord]:
    """Records of a .json (list) or .jsonl file; an unreadable .json file raises DataFormatError.

    For JSONL the index is the 0-based line number (blank lines are counted, not yielded), and a bad
    line becomes a RawRecord with `error` set, so a checker can go on to the next line.
    """
    path = Path(path)
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            for line_index, line in enumerate(handle):
                if not line.strip():
                    continue
                try:
                    yield RawRecord(line_index, json.loads(line))
                except json.JSONDecodeError as error:
                    yield RawRecord(line_index, error=f"{path} record {line_index} (line {line_index + 1}): {error}")
    elif path.suffix == ".json":
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise DataFormatError(f"{path}: bad JSON: {error}") from error
        if not isinstance(records, list):
            kind = type(records).__name__
            raise DataFormatError(f"{path}: a .json data file must hold a list of records, got {kind}")
        yield from (RawRecord(index, value) for index, value in enumerate(records))
    else:
        raise DataFormatError(f"{path}: unknown data file type {path.suffix!r}; use .json or .jsonl")


def conversation_from_raw(raw: RawRecord, path: Path, image_root: Path | None = None) -> Conversation:
    """Parse a RawRecord of `path` (images relative to `image_root`, default the file's folder); raises
    DataFormatError."""
    if raw.error is not None:
        raise DataFormatError(f"bad JSON in {raw.error}")
    return parse_record(raw.value, str(path), raw.index, path.parent if image_root is None else image_root)


def load_conversations(path: str | Path, image_folder: str | Path | None = None) -> list[Conversation]:
    """All records of a LLaVA .json / .jsonl file; image paths resolved against `image_folder`, default the file's
    folder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    root = None if image_folder is None else Path(image_folder)
    return [conversation_from_raw(raw, path, root) for raw in iter_raw_records(path)]


def conversations_from_dataset(
    dataset, image_root: str | Path | None = None, name: str = "dataset"
) -> list[Conversation]:
    """Records of a `datasets.Dataset` with LLaVA columns ("conversations", optional "image", extras).

    Args:
        dataset: rows with the LLaVA fields; "image" may hold paths or decoded PIL images (datasets' Image).
        image_root: folder that relative image paths are resolved against (None: as given).
        name: how errors name this source.
    """
    root = None if image_root is None else Path(image_root)
    return [parse_record(dict(row), name, index, root) for index, row in enumerate(dataset)]


def _read_image(image: ImageSource, where: str, read: Callable[[Image.Image], T], action: str) -> T:
    """`read` an in-memory image, encoded bytes or the file at `image`, raising MissingImageError / CorruptImageError
    that name `where` and, for a file or bytes that fail, the `action` attempted."""
    if isinstance(image, Image.Image):
        return read(image)
    if isinstance(image, EncodedImage):
        name, opened = image.name or "embedded image", io.BytesIO(image.data)
    elif not image.is_file():
        raise MissingImageError(f"{where} {image}: file not found")
    else:
        name, opened = image, image
    try:
        with Image.open(opened) as handle:
            return read(handle)
    except (OSError, SyntaxError, ValueError) as error:
        raise CorruptImageError(f"{where} {name}: cannot {action}: {error}") from error


def open_image(image: ImageSource, where: str) -> Image.Image:
    """Fully decode one image as RGB; `where` names it in MissingImageError / CorruptImageError."""
    # convert() forces a full decode, so truncated files fail here, not in a training worker.
    return _read_image(image, where, lambda handle: handle.convert("RGB"), "decode")


def image_size(image: ImageSource, where: str) -> tuple[int, int]:
    """(height, width) of one image from its header alone (no decode); errors as `open_image`'s."""
    return _read_image(image, where, lambda handle: (handle.height, handle.width), "read its header")


def region_messages(conversation: Conversation) -> list[dict[str, str]]:
    """The record's messages with each `<region>` replaced by its box text, measured on the images' headers.

    For code that hands the processor images other than the record's own (eval's blank images): the box texts stay
    those of the original images. Raises RegionError naming the record and region.
    """
    where = conversation.location
    images = conversation.images if conversation.regions else []  # headers are read only when there are boxes
    sizes = [image_size(image, f"{where}: image {index}") for index, image in enumerate(images)]
    try:
        return fill_regions(conversation.messages, conversation.regions, sizes)
    except RegionError as error:
        raise RegionError(f"{where}: {error}") from None


def open_images(conversation: Conversation) -> list[Image.Image]:
    """All images of a record, decoded as RGB, in placeholder order."""
    return [
        open_image(image, f"{conversation.location}: image {index}") for index, image in enumerate(conversation.images)
    ]
