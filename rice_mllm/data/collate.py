"""Padding collator: processor samples -> one batch (right padding, -100 labels, tiles concatenated).

Follows the processor batch contract: pixel_values [total_tiles, 3, S, S] in image order, image_sizes
[num_images, 2]. Invariant: no sample or image is dropped; text-only samples add no tiles.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rice_mllm.constants import IGNORE_INDEX


class PaddingCollator:
    """Batches samples from RiceMllmProcessor.

    Args:
        pad_token_id: id written into padded input_ids positions (masked out by attention_mask).
        pad_to_multiple_of: round the batch length up to a multiple of this (e.g. 8 for tensor cores).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Pad and stack.

        Args:
            samples: dicts with input_ids, labels, attention_mask [T_i]; pixel_values [tiles_i, 3, S, S];
                image_sizes [images_i, 2]; batch_num_images [1].

        Returns:
            input_ids, labels, attention_mask [B, T]; pixel_values [sum tiles_i, 3, S, S]; image_sizes
            [sum images_i, 2]; batch_num_images [B]. A batch without images has 0 tiles and 0 sizes.
        """
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        length = max(len(sample["input_ids"]) for sample in samples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": torch.full((len(samples), length), self.pad_token_id, dtype=torch.long),
            "labels": torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long),
            "attention_mask": torch.zeros((len(samples), length), dtype=torch.long),
        }
        for row, sample in enumerate(samples):
            for key in ("input_ids", "labels", "attention_mask"):
                batch[key][row, : len(sample[key])] = sample[key]
        batch["pixel_values"] = torch.cat([sample["pixel_values"] for sample in samples], dim=0)
        batch["image_sizes"] = torch.cat([sample["image_sizes"] for sample in samples], dim=0)
        batch["batch_num_images"] = torch.cat([sample["batch_num_images"] for sample in samples], dim=0)
        return batch
