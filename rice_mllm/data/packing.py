"""Padding-free packing: several processor samples per row, first fit, never splitting a sample (or its images).

A packed batch has no attention_mask; `position_ids` restart at 0 for every sample, and transformers' mask utilities
(masking_utils.find_packed_sequence_indices) turn those restarts into per-sample causal blocks, so attention never
crosses a sample boundary. Invariant: the loss is the same per-token mean as an unpacked batch of the same samples.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from rice_mllm.constants import IGNORE_INDEX
from rice_mllm.data.collate import concat_images
from rice_mllm.mllm.processing import SampleTooLongError


def _check_lengths(lengths: Sequence[int], max_tokens: int, indices: Sequence[int]) -> None:
    for index in indices:
        if lengths[index] > max_tokens:
            raise SampleTooLongError(f"sample {index} has {lengths[index]} tokens > max_tokens {max_tokens}")


def first_fit_rows(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Pack samples, in the given order, into rows of at most `max_tokens`: each goes to the first row with room.

    Args:
        lengths: tokens per sample.
        max_tokens: row capacity.

    Returns:
        Rows of sample indices; every index appears once, ascending within a row.

    Raises:
        SampleTooLongError: naming the first sample longer than `max_tokens`.
    """
    _check_lengths(lengths, max_tokens, range(len(lengths)))
    rows: list[list[int]] = []
    free: list[int] = []
    for index, length in enumerate(lengths):
        row = next((r for r, space in enumerate(free) if space >= length), None)
        if row is None:
            rows.append([])
            free.append(max_tokens)
            row = len(rows) - 1
        rows[row].append(index)
        free[row] -= length
    return rows


class PackingCollator:
    """Packs processor samples into rows of `max_tokens` by first fit in the order given, for training.

    Feed it the model directly: `model(**batch)`. Each sample keeps its tokens contiguous and its position ids
    0..len-1; the gap after the last sample of a row is one padding segment (its own position ids from 0, labels
    -100), so no real token attends to it.

    Args:
        max_tokens: row capacity; a longer sample raises SampleTooLongError.
        pad_token_id: id written into the padding segment.
        pad_to_multiple_of: round the row width up to a multiple of this.
    """

    def __init__(self, max_tokens: int, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        self.max_tokens = max_tokens
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Pack.

        Args:
            samples: dicts with input_ids, labels [T_i]; pixel_values [tiles_i, 3, S, S]; image_sizes [images_i, 2];
                batch_num_images [1].

        Returns:
            input_ids, labels, position_ids [R, W] (R rows, W = longest row, rounded up); pixel_values
            [sum tiles_i, 3, S, S], image_sizes [sum images_i, 2] and batch_num_images [B] (per sample, not per
            row), and region boxes when samples have them, in row order, which is the order the model meets the
            `<image>` runs (`concat_images`). No attention_mask: packing is read from the position ids.
        """
        if not samples:
            raise ValueError("cannot pack an empty list of samples")
        rows = first_fit_rows([len(sample["input_ids"]) for sample in samples], self.max_tokens)
        width = max(sum(len(samples[i]["input_ids"]) for i in row) for row in rows)
        if self.pad_to_multiple_of:
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": torch.full((len(rows), width), self.pad_token_id, dtype=torch.long),
            "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
            "position_ids": torch.zeros((len(rows), width), dtype=torch.long),
        }
        for r, row in enumerate(rows):
            start = 0
            for index in row:
                ids = samples[index]["input_ids"]
                end = start + len(ids)
                batch["input_ids"][r, start:end] = ids
                batch["labels"][r, start:end] = samples[index]["labels"]
                # Nothing predicts a sample's first token in an unpacked batch; in a row the previous sample's last
                # token would, so its label is masked to keep the loss identical.
                batch["labels"][r, start] = IGNORE_INDEX
                batch["position_ids"][r, start:end] = torch.arange(len(ids))
                start = end
            batch["position_ids"][r, start:] = torch.arange(width - start)
        return {**batch, **concat_images([samples[index] for row in rows for index in row])}


def _epoch_order(size: int, seed: int, epoch: int) -> tuple[random.Random, list[int]]:
    rng = random.Random(f"{seed}-{epoch}")
    order = list(range(size))
    rng.shuffle(order)
    return rng, order


class PackedBatchSampler(Sampler[list[int]]):
    """Cuts a shuffled epoch into steps that fill `rows_per_batch` rows of `max_tokens` (a DataLoader
    `batch_sampler` for PackingCollator): each step takes, in order, every sample of the next `lookahead` that
    still fits by first fit, so steps carry about the same number of tokens however long the samples are.
    Deterministic per (seed, epoch); call `set_epoch` each epoch. The collator's first fit over a step's indices, in
    the order given, rebuilds exactly the rows planned here.

    Args:
        lengths: tokens per dataset item.
        max_tokens: row width, as given to PackingCollator; a longer sample raises SampleTooLongError.
        rows_per_batch: rows per step (per rank).
        lookahead: how many upcoming samples a step may pick from (bounds the planning cost).
        seed: base seed.
    """

    def __init__(
        self, lengths: Sequence[int], max_tokens: int, rows_per_batch: int, lookahead: int = 256, seed: int = 0
    ) -> None:
        if min(max_tokens, rows_per_batch, lookahead) < 1:
            raise ValueError(
                f"max_tokens, rows_per_batch, lookahead must be positive: {max_tokens, rows_per_batch, lookahead}"
            )
        _check_lengths(lengths, max_tokens, range(len(lengths)))
        self.lengths = list(lengths)
        self.max_tokens = max_tokens
        self.rows_per_batch = rows_per_batch
        self.lookahead = lookahead
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        """This epoch's steps, each a list of dataset indices in collation order."""
        order = _epoch_order(len(self.lengths), self.seed, self.epoch)[1]
        batches: list[list[int]] = []
        carried: list[int] = []  # skipped by earlier steps; never more than lookahead - 1 (a step takes >= 1)
        cursor = 0
        while carried or cursor < len(order):
            window = carried + order[cursor : cursor + self.lookahead - len(carried)]
            cursor += self.lookahead - len(carried)
            free = [self.max_tokens] * self.rows_per_batch
            taken, carried = [], []
            for index in window:
                row = next((r for r, space in enumerate(free) if space >= self.lengths[index]), None)
                if row is None:
                    carried.append(index)
                else:
                    free[row] -= self.lengths[index]
                    taken.append(index)
            batches.append(taken)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())


class LengthGroupedSampler(Sampler[int]):
    """Shuffles, then sorts each mega-batch of `batch_size * group_batches` samples by length (longest first), so
    batches hold similar lengths and padding shrinks; batches themselves are then shuffled. The padded alternative
    to packing. Deterministic per (seed, epoch); call `set_epoch` each epoch.

    Args:
        lengths: tokens per dataset item (cheap to compute: `processor.encode(messages, image_sizes)`).
        batch_size: samples per batch (per rank).
        group_batches: batches per sorted mega-batch; larger groups pad less but randomise less.
        seed: base seed.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, group_batches: int = 50, seed: int = 0) -> None:
        if batch_size < 1 or group_batches < 1:
            raise ValueError(f"batch_size and group_batches must be positive, got {batch_size}, {group_batches}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.group_size = batch_size * group_batches
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        """This epoch's batches of dataset indices (the last one may be short)."""
        rng, order = _epoch_order(len(self.lengths), self.seed, self.epoch)
        batches = []
        for group_start in range(0, len(order), self.group_size):
            group = sorted(order[group_start : group_start + self.group_size], key=lambda i: -self.lengths[i])
            batches += [group[i : i + self.batch_size] for i in range(0, len(group), self.batch_size)]
        # Only the very last batch can be short (groups are whole batches); it stays last so that a DataLoader
        # re-cutting the index stream into batch_size chunks meets the same batches.
        short = [batches.pop()] if batches and len(batches[-1]) < self.batch_size else []
        rng.shuffle(batches)
        return batches + short

    def __iter__(self) -> Iterator[int]:
        return (index for batch in self.batches() for index in batch)

    def __len__(self) -> int:
        return len(self.lengths)
