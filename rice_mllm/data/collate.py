"""Padding collator: processor samples -> one batch (right padding, -100 labels, tiles concatenated).

Follows the processor batch contract: pixel_values [total_tiles, 3, S, S] in image order, image_sizes
[num_images, 2]; region_boxes / region_images when samples carry boxes for region tokens. Invariant: no sample, image
or box is dropped; text-only samples add no tiles.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rice_mllm.constants import IGNORE_INDEX

IMAGE_KEYS = ("pixel_values", "image_sizes", "batch_num_images")


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
        return {**batch, **concat_images(samples)}


def concat_images(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The images of `samples`, in the order given (the order the model meets their `<image>` runs): pixel_values,
    image_sizes, batch_num_images; and, when a sample has boxes for region tokens, region_boxes [R, 4] with
    region_images [R] renumbered from each sample's images to the batch's."""
    images = {key: torch.cat([sample[key] for sample in samples], dim=0) for key in IMAGE_KEYS}
    if not any("region_boxes" in sample for sample in samples):
        return images
    boxes, owners, first_image = [], [], 0
    for sample in samples:
        if "region_boxes" in sample:
            boxes.append(sample["region_boxes"])
            owners.append(sample["region_images"] + first_image)
        first_image += len(sample["image_sizes"])
    return {**images, "region_boxes": torch.cat(boxes), "region_images": torch.cat(owners)}
