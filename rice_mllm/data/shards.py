"""Parquet shards with embedded image bytes: many files read lazily as one indexed (map-style) source; atomic writes.

Why indexed and not a streaming iterable: the trainer draws a seeded permutation per epoch, strides it over ranks, lets
the DataLoader split batches over workers and, on resume, skips exactly the samples of the steps already done
(train/data_order.py). A source that reads any row on demand gets rank split, worker split, exact mid-epoch resume and
length grouping from that, unchanged. Why pyarrow and not `datasets`: `Dataset.from_parquet` first copies every shard
into an Arrow cache (twice the disk, a full pass before step one), and `datasets` streaming has no index to permute or
skip. A random row costs one row-group read (a few recent groups stay decoded), so shards written here use small row
groups. Rows are indexed in shard-name order (resuming needs the same shards); a row is named `shard.parquet row N`,
N 0-based within its file.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rice_mllm.data.sources import DataFormatError, EncodedImage

PARQUET = ".parquet"
ROWS_PER_SHARD = 1000  # a random read opens its shard and parses its footer: about 30 KiB, 0.2 ms at 1000 rows
OPEN_SHARDS = 64  # file handles (with parsed footers) kept per process
ROWS_PER_GROUP = 16  # a random read decodes one group: small groups keep that close to one sample
# datasets' Image feature: {"bytes", "path"}; such columns show as images in `datasets.load_dataset("parquet", ...)`
IMAGE_CELL = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


class ShardFormatError(DataFormatError):
    """A shard cannot be read, or lacks a column its layout needs."""


def is_shards(path: str | Path) -> bool:
    """A .parquet file, or a folder holding .parquet files."""
    path = Path(path)
    return path.suffix == PARQUET or (path.is_dir() and any(path.glob(f"*{PARQUET}")))


def shard_files(path: str | Path) -> list[Path]:
    """The .parquet file `path`, or the .parquet files directly in folder `path`, sorted by name."""
    path = Path(path)
    files = sorted(path.glob(f"*{PARQUET}")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"{path}: no Parquet shards (a .parquet file or a folder of them)")
    return files


class ShardRows:
    """The rows of Parquet shards as one 0-based index space, read on demand one row group at a time.

    Opening reads the footers only. Each process (a DataLoader worker too) opens its own file handles.

    Args:
        path: a .parquet file or a folder of them (`shard_files`).
        columns: columns to read; every one must exist in every shard. None: all.
        required: columns every shard must have besides `columns` (a layout's own; checked from the footers).
        cache_groups: decoded row groups kept per process.
    """

    def __init__(
        self, path: str | Path, columns: list[str] | None = None, required: list[str] = (), cache_groups: int = 4
    ) -> None:
        self.files, self.columns, self.cache_groups = shard_files(path), columns, cache_groups
        counts, owner, file_rows = [], [], []
        for number, file in enumerate(self.files):
            meta = _metadata(file)
            names = meta.schema.to_arrow_schema().names
            if missing := sorted({*(columns or []), *required} - set(names)):
                raise ShardFormatError(f"{file}: no column(s) {missing}; the shard has {names}")
            counts += [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            owner += [(number, g) for g in range(meta.num_row_groups)]
            file_rows.append(meta.num_rows)
        self._group_start = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])  # [groups + 1]
        self._group_owner = np.array(owner, dtype=np.int64).reshape(-1, 2)  # [groups, 2]: file number, group in file
        self._file_start = np.concatenate([[0], np.cumsum(file_rows, dtype=np.int64)])  # [files + 1]
        self._pid, self._handles, self._cache = -1, OrderedDict(), OrderedDict()

    def __len__(self) -> int:
        return int(self._group_start[-1])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pid": -1, "_handles": OrderedDict(), "_cache": OrderedDict()}

    def locate(self, index: int) -> tuple[Path, int]:
        """(shard file, 0-based row within it) of global row `index`."""
        group = self._group_of(index)
        file = int(self._group_owner[group, 0])
        return self.files[file], index - int(self._file_start[file])

    def where(self, index: int) -> str:
        file, row = self.locate(index)
        return f"{file} row {row}"

    def __getitem__(self, index: int) -> dict[str, Any]:
        group = self._group_of(index)
        return self._group(group).slice(index - int(self._group_start[group]), 1).to_pylist()[0]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for group in range(len(self._group_owner)):
            yield from self._group(group).to_pylist()

    def _group_of(self, index: int) -> int:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of {len(self)} in {len(self.files)} shard(s)")
        return int(np.searchsorted(self._group_start, index, side="right")) - 1

    def _group(self, group: int) -> pa.Table:
        if self._pid != os.getpid():  # a forked worker must not share the parent's handles
            self._pid, self._handles, self._cache = os.getpid(), OrderedDict(), OrderedDict()
        if group in self._cache:
            self._cache.move_to_end(group)
            return self._cache[group]
        number, in_file = (int(v) for v in self._group_owner[group])
        try:
            table = self._handle(number).read_row_group(in_file, columns=self.columns)
        except (OSError, pa.ArrowException) as error:
            raise ShardFormatError(f"{self.files[number]}: cannot read row group {in_file}: {error}") from error
        self._cache[group] = table
        if len(self._cache) > self.cache_groups:
            self._cache.popitem(last=False)
        return table

    def _handle(self, number: int) -> pq.ParquetFile:
        if number not in self._handles:
            self._handles[number] = pq.ParquetFile(self.files[number])
            if len(self._handles) > OPEN_SHARDS:  # bounded: a run may span thousands of shards
                self._handles.popitem(last=False)[1].close()
        self._handles.move_to_end(number)
        return self._handles[number]


def _metadata(file: Path) -> pq.FileMetaData:
    try:
        return pq.read_metadata(file)
    except (OSError, pa.ArrowException) as error:
        raise ShardFormatError(f"{file}: not a readable Parquet file: {error}") from error


class ShardWriter:
    """Rows -> `out/{prefix}-00000.parquet`, ... of `rows_per_shard` rows in row groups of `rows_per_group`.

    Each shard is written as a `.tmp` file and renamed once complete, so a killed conversion leaves whole shards only.
    `out` must hold no shards yet (new ones would mix with them). Use as a context manager; `files` lists the shards.
    """

    def __init__(
        self,
        out: str | Path,
        schema: pa.Schema,
        rows_per_shard: int = ROWS_PER_SHARD,
        rows_per_group: int = ROWS_PER_GROUP,
        prefix: str = "shard",
    ) -> None:
        if rows_per_shard < 1 or rows_per_group < 1:
            raise ValueError(f"rows_per_shard={rows_per_shard} and rows_per_group={rows_per_group} must be >= 1")
        self.out, self.schema, self.prefix = Path(out), schema, prefix
        self.rows_per_shard, self.rows_per_group = rows_per_shard, min(rows_per_group, rows_per_shard)
        if is_shards(self.out):
            raise FileExistsError(f"{self.out} already holds Parquet shards: write into an empty folder")
        self.out.mkdir(parents=True, exist_ok=True)
        self.files: list[Path] = []
        self._buffer: list[dict] = []
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_shard = 0

    def write(self, row: dict[str, Any]) -> None:
        self._buffer.append(row)
        if len(self._buffer) == self.rows_per_group or self._rows_in_shard + len(self._buffer) == self.rows_per_shard:
            self._flush()

    def _flush(self) -> None:
        if self._writer is None:
            path = self.out / f"{self.prefix}-{len(self.files):05d}{PARQUET}"
            self.files.append(path)
            # no column statistics: min/max of image bytes would fill the footer that every reader parses
            self._writer = pq.ParquetWriter(f"{path}.tmp", self.schema, write_statistics=False)
        self._writer.write_table(pa.Table.from_pylist(self._buffer, schema=self.schema))
        self._rows_in_shard += len(self._buffer)
        self._buffer = []
        if self._rows_in_shard == self.rows_per_shard:
            self._close_shard()

    def _close_shard(self) -> None:
        self._writer.close()
        os.replace(f"{self.files[-1]}.tmp", self.files[-1])
        self._writer, self._rows_in_shard = None, 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if error is None:
            if self._buffer:
                self._flush()
            if self._writer is not None:
                self._close_shard()
        elif self._writer is not None:  # leave no half shard behind, not even as .tmp
            self._writer.close()
            Path(f"{self.files.pop()}.tmp").unlink()


def rechunk_shards(
    path: str | Path, out: str | Path, rows_per_shard: int = ROWS_PER_SHARD, rows_per_group: int = ROWS_PER_GROUP
) -> dict[str, int]:
    """The rows of shards written elsewhere (e.g. in the 100-row groups `datasets` writes for images, where each random
    read decodes 100 images) -> `out`, unchanged, in small row groups. Every shard must have the first one's schema."""
    rows = ShardRows(path)
    schema = pq.read_schema(rows.files[0])
    for file in rows.files[1:]:
        if not pq.read_schema(file).equals(schema):
            raise ShardFormatError(f"{file}: its schema differs from {rows.files[0]}'s: rechunk them apart")
    with ShardWriter(out, schema, rows_per_shard, rows_per_group) as writer:
        for row in rows:
            writer.write(row)
    return {"records": len(rows), "shards": len(writer.files)}


def image_cell(path: Path, name: str) -> dict[str, Any]:
    """The cell of an image file: its bytes as they are (no re-encoding) and `name`, the path it came from."""
    return {"bytes": path.read_bytes(), "path": name}


def cell_image(cell: Any, where: str, root: Path) -> EncodedImage | Path:
    """An image cell (bytes, or a {"bytes", "path"} struct as datasets' Image feature writes it) -> an EncodedImage;
    a struct without bytes -> its file path, relative to `root`. Raises DataFormatError naming `where`."""
    if isinstance(cell, bytes):
        return EncodedImage(cell)
    if isinstance(cell, dict) and cell.get("bytes"):
        return EncodedImage(cell["bytes"], cell.get("path") or "")
    if isinstance(cell, dict) and cell.get("path"):
        path = Path(cell["path"])
        return path if path.is_absolute() else root / path
    raise DataFormatError(f"{where}: an image cell needs bytes or a path, got {cell!r:.80}")


def hf_schema(schema: pa.Schema, image_columns: dict[str, Any]) -> pa.Schema:
    """`schema` with datasets' feature metadata, `image_columns` mapping a column to its feature (e.g. `Image()`)."""
    import datasets  # only writers need it

    features = datasets.Features.from_arrow_schema(schema)
    features.update(image_columns)
    return features.arrow_schema
