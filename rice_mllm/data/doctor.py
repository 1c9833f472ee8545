"""Data doctor: open every image and render every sample; report each bad record by file, index and reason.

Checks: schema, missing / corrupt images, placeholder vs image counts, regions (count, empty or outside their image,
before any image: "bad region", naming the region), no supervised token, over-length, plus token-length statistics.
Invariant: every record is either rendered or listed as a problem.
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from rice_mllm.checkpoint_layout import PROCESSOR_CONFIG_FILE, CheckpointFormatError, resolve_model_dir
from rice_mllm.constants import IGNORE_INDEX
from rice_mllm.data.conversation_shards import ConversationShards, conversation_from_row
from rice_mllm.data.shards import ShardFormatError, ShardRows, is_shards
from rice_mllm.data.sources import (
    Conversation,
    CorruptImageError,
    DataFormatError,
    MissingImageError,
    conversation_from_raw,
    iter_raw_records,
    open_image,
    parse_record,
)
from rice_mllm.mllm.anyres import DEFAULT_MAX_TILES, DEFAULT_MULTI_IMAGE_TILING
from rice_mllm.mllm.assembly import build_processor
from rice_mllm.mllm.boxes import RegionError
from rice_mllm.mllm.chat_template import DEFAULT_TEMPLATE, TEMPLATES
from rice_mllm.mllm.grid_pinpoints import FORMS as GRID_FORMS
from rice_mllm.mllm.processing import ImagePlaceholderError, RiceMllmProcessor, SampleTooLongError, count_placeholders
from rice_mllm.presets import load_preset

# Tokenizer used when neither --processor nor --tokenizer is given (None: one of them is required).
DEFAULT_TOKENIZER: str | None = None
# Without --processor: LLaVA-NeXT's 336 px tower with the kit's anyres defaults (None: build_processor's).
_TOWER = load_preset("rice-vit-l14-336")
GEOMETRY_DEFAULTS = {
    "tile_size": _TOWER["image_size"],
    "patch_size": _TOWER["patch_size"],
    "image_grid_pinpoints": None,
    "max_tiles": None,
    "max_grid_tiles": None,
    "multi_image_tiling": DEFAULT_MULTI_IMAGE_TILING,
}


@dataclass(frozen=True)
class Problem:
    """One defect of one record (index None: the whole source); `unit` is "row" for a Parquet shard's rows."""

    source: str
    index: int | None
    kind: str
    detail: str
    unit: str = "record"

    def __str__(self) -> str:
        where = self.source if self.index is None else f"{self.source} {self.unit} {self.index}"
        return f"{where}: {self.kind}: {self.detail}"


@dataclass
class DataReport:
    """What a check found: problems, and token lengths of every rendered record."""

    records: int = 0
    images: int = 0
    problems: list[Problem] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"checked {self.records} records with {self.images} images: {len(self.problems)} problem(s)"]
        lines += [f"  {kind}: {count}" for kind, count in sorted(Counter(p.kind for p in self.problems).items())]
        if self.lengths:
            ordered = sorted(self.lengths)
            p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
            lines.append(
                f"tokens per sample: min {ordered[0]}, mean {statistics.fmean(ordered):.1f}, "
                f"median {statistics.median(ordered):g}, p95 {p95}, max {ordered[-1]}"
            )
        return "\n".join(lines)


def check_conversation(conversation: Conversation, processor: RiceMllmProcessor, report: DataReport) -> None:
    """Check one record and add its problems and token length to `report`."""

    def problem(kind: str, detail: str) -> None:
        report.problems.append(Problem(conversation.source, conversation.index, kind, detail, conversation.unit))

    report.records += 1
    report.images += len(conversation.images)
    sizes = []
    for image_index, image in enumerate(conversation.images):
        try:
            opened = open_image(image, f"image {image_index}")
            sizes.append((opened.height, opened.width))
        except MissingImageError as error:
            problem("missing image", str(error))
        except CorruptImageError as error:
            problem("corrupt image", str(error))
    placeholders, images = count_placeholders(conversation.messages), len(conversation.images)
    if placeholders != images:
        problem("placeholder mismatch", f"{placeholders} <image> placeholder(s) but {images} image(s)")
        return
    if len(sizes) != images:
        return  # token count needs every image's size
    try:
        sample = processor.encode(conversation.messages, sizes, regions=conversation.regions)
    except RegionError as error:
        problem("bad region", str(error))
        return
    except (ImagePlaceholderError, ValueError, TypeError) as error:
        problem("unrenderable", str(error))
        return
    length = len(sample["input_ids"])
    report.lengths.append(length)
    if not (sample["labels"] != IGNORE_INDEX).any():
        problem("no supervised token", "no assistant reply to learn from")
    try:
        processor.check_length(length)
    except SampleTooLongError as error:
        problem("too long", str(error))


def check_records(
    records: Iterable[Conversation | Problem], processor: RiceMllmProcessor, report: DataReport, progress: bool = True
) -> DataReport:
    """Check records (a Problem in the stream is a record that failed to parse) into `report`."""
    for record in tqdm(records, desc="data check", unit="rec", disable=not progress):
        if isinstance(record, Problem):
            report.records += 1
            report.problems.append(record)
        else:
            check_conversation(record, processor, report)
    return report


def _parsed_file(path: Path) -> list[Conversation | Problem]:
    parsed: list[Conversation | Problem] = []
    for raw in iter_raw_records(path):
        try:
            parsed.append(conversation_from_raw(raw, path))
        except DataFormatError as error:
            parsed.append(Problem(str(path), raw.index, "bad record", str(error)))
    return parsed


def _parsed_dataset(path: Path) -> list[Conversation | Problem]:
    import datasets  # only this source needs it

    parsed: list[Conversation | Problem] = []
    for index, row in enumerate(datasets.load_from_disk(str(path))):
        try:
            parsed.append(parse_record(dict(row), str(path), index, path))
        except DataFormatError as error:
            parsed.append(Problem(str(path), index, "bad record", str(error)))
    return parsed


def _parsed_shards(path: Path) -> Iterator[Conversation | Problem]:
    """Every row of Parquet shards, one row group in memory at a time (shards may hold millions of images)."""
    files = ConversationShards(path).rows.files  # unreadable footers, a wrong layout: raised here, before the rows

    def parsed() -> Iterator[Conversation | Problem]:
        for file in files:
            try:
                for number, row in enumerate(ShardRows(file)):
                    try:
                        yield conversation_from_row(row, file, number, None)
                    except DataFormatError as error:
                        yield Problem(str(file), number, "bad record", str(error), "row")
            except ShardFormatError as error:  # a damaged row group: the rest of this file cannot be read
                yield Problem(str(file), None, "unreadable source", str(error))

    return parsed()


def check_source(path: str | Path, processor: RiceMllmProcessor, report: DataReport, progress: bool = True) -> None:
    """Check a LLaVA .json / .jsonl file, Parquet shards (a file or folder), or a `datasets` save_to_disk folder."""
    path = Path(path)
    try:
        if is_shards(path):
            records = _parsed_shards(path)
        elif path.is_dir():
            records = _parsed_dataset(path)
        elif path.is_file():
            records = _parsed_file(path)
        else:
            raise FileNotFoundError(f"{path} does not exist")
    except (DataFormatError, OSError) as error:
        report.problems.append(Problem(str(path), None, "unreadable source", str(error)))
        return
    check_records(records, processor, report, progress)


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `data check`: the sources, and flags that build the processor whose rendering is checked."""
    parser.add_argument(
        "files", nargs="+", help=".json / .jsonl LLaVA files, Parquet shards (file or folder), save_to_disk folders"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--processor", help="a processor folder, or a model's model, checkpoint or run folder")
    parser.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="tokenizer folder or hub id (no --processor)")
    parser.add_argument("--tile-size", type=int, help=f"without --processor; default {GEOMETRY_DEFAULTS['tile_size']}")
    parser.add_argument(
        "--patch-size", type=int, help=f"without --processor; default {GEOMETRY_DEFAULTS['patch_size']}"
    )
    parser.add_argument("--image-grid-pinpoints", help=f"without --processor: the grids, as {GRID_FORMS}")
    parser.add_argument(
        "--max-tiles",
        type=int,
        help=f"without --processor: grids of at most this many tiles; default {DEFAULT_MAX_TILES}",
    )
    parser.add_argument("--max-grid-tiles", type=int, help="OneVision anyres_max_K token budget (default: none)")
    parser.add_argument(
        "--multi-image-tiling",
        choices=("anyres", "base"),
        help=f"without --processor: how multi-image samples' images are cut (base: base tile only); default "
        f"{GEOMETRY_DEFAULTS['multi_image_tiling']}",
    )
    parser.add_argument(
        "--template",
        choices=sorted(TEMPLATES),
        help=f"how samples are rendered (overrides the processor's, as a later stage's data.template does); default "
        f"the processor's, else {DEFAULT_TEMPLATE}",
    )
    parser.add_argument("--max-length", type=int, help="longest allowed sample in tokens (overrides the processor's)")


def processor_from_args(args: argparse.Namespace) -> RiceMllmProcessor:
    """A model's saved processor (--processor), or one made from --tokenizer and the geometry flags."""
    geometry_flags = {key: getattr(args, key) for key in GEOMETRY_DEFAULTS}
    if args.processor:
        given = sorted(f"--{key.replace('_', '-')}" for key, value in geometry_flags.items() if value is not None)
        given += ["--tokenizer"] if args.tokenizer not in (None, DEFAULT_TOKENIZER) else []
        if given:
            raise SystemExit(f"data check: {given} conflict with --processor, whose saved geometry is used")
        folder = Path(args.processor)
        try:
            if not (folder / PROCESSOR_CONFIG_FILE).is_file():  # a bare processor folder, or one beside a model
                folder = resolve_model_dir(folder)
            processor = RiceMllmProcessor.from_pretrained(folder)
        except (CheckpointFormatError, FileNotFoundError) as error:
            raise SystemExit(f"data check: --processor: {error}") from None
        max_length = processor.max_length if args.max_length is None else args.max_length
        template = args.template or processor.template
        return RiceMllmProcessor(processor.tokenizer, processor.image_processor, max_length, template)
    if not args.tokenizer:
        raise SystemExit("data check: give --processor DIR or --tokenizer DIR")
    flags = {key: GEOMETRY_DEFAULTS[key] if value is None else value for key, value in geometry_flags.items()}
    try:
        return build_processor(
            args.tokenizer, max_length=args.max_length, template=args.template or DEFAULT_TEMPLATE, **flags
        )
    except ValueError as error:  # grid settings that cannot be read or disagree
        raise SystemExit(f"data check: {error}") from None


def run_check(args: argparse.Namespace) -> int:
    """Check every source in args.files, print problems and the summary; 1 if any problem, else 0."""
    processor = processor_from_args(args)
    report = DataReport()
    for path in args.files:
        check_source(path, processor, report, progress=not args.no_progress)
    for problem in report.problems:
        print(problem)
    print(report.summary())
    return 1 if report.problems else 0
