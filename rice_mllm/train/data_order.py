"""Which samples each rank trains on, in which order: a pure function of (seed, epoch, rank, world size).

That purity is what exact resume rests on: a checkpoint stores only its step, and the same order is drawn again.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from ..data.packing import LengthGroupedSampler
from .engine import rank, world_size


def epoch_indices(num_samples: int, seed: int, epoch: int) -> list[int]:
    """This rank's sample order for one epoch: a seeded permutation, strided over ranks, cut to equal lengths.

    Equal lengths matter: a rank with one more batch would wait forever in a ZeRO collective.
    """
    perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    per_rank = num_samples // world_size()
    return perm[rank() :: world_size()][:per_rank]


def grouped_epoch_indices(lengths: list[int], micro: int, seed: int, epoch: int) -> list[int]:
    """This rank's order for one epoch in micro-batches of similar token length (`data.group_by_length`).

    Global batches of micro * world_size records come from LengthGroupedSampler and each is cut into one slice per
    rank, so every rank's micro-batch pads little and all ranks run the same number of steps. The short last batch
    is dropped, as the plain order drops the epoch's remainder.
    """
    sampler = LengthGroupedSampler(lengths, micro * world_size(), seed=seed)
    sampler.set_epoch(epoch)
    full = [batch for batch in sampler.batches() if len(batch) == micro * world_size()]
    return [index for batch in full for index in batch[rank() * micro : (rank() + 1) * micro]]


def epoch_batches(
    dataset: Dataset,
    collate: Callable[[list], dict],
    lengths: list[int] | None,
    micro: int,
    skip: int,
    seed: int,
    epoch: int,
    num_workers: int,
):
    """An iterator over this rank's micro-batches of one epoch, starting after its first `skip` samples."""
    if lengths is None:
        order = epoch_indices(len(dataset), seed, epoch)
    else:
        order = grouped_epoch_indices(lengths, micro, seed, epoch)
    # a private generator: creating a loader iterator otherwise draws from the global RNG, so a resumed run
    # (one extra iterator) would get other dropout masks than the uninterrupted one
    loader = DataLoader(
        dataset,
        batch_size=micro,
        sampler=order[skip:],
        collate_fn=collate,
        drop_last=True,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed + epoch),
    )
    return iter(loader)
