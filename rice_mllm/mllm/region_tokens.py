"""Region tokens: one LLM input embedding per box, pooled by RICE's region transformer from the image's encoder pass.

A box in a user turn (0-1000 of its image, Qwen2.5's box format) is followed by a `<|region_pad|>` token whose
embedding is the region's feature: the stage-0 code path (`region_inputs` -> `box_patch_masks` -> `region_attention`;
weight-free, the image's CLS queries the box's visible patches) over the image's base tile, read from the same encoder
pass as the image features (with region tokens on, every block runs), then the multimodal projector. The base tile
sees the whole image: squashed to S x S for a tiled image (so 0-1000 coordinates scale straight to the tile), centred
on a square for an image that gives its base tile only."""

from __future__ import annotations

import torch

from ..pretrain.region_head import box_patch_masks, region_attention, region_inputs
from ..vision import RiceVisionModel

BOX_SCALE = 1000  # Qwen2.5's box coordinates: 0-1000 of the image's width (x) and height (y)


def boxes_on_base_tile(
    boxes: torch.Tensor, image_sizes: torch.Tensor, tiled: torch.Tensor, tile_size: int
) -> torch.Tensor:
    """Boxes in 0-1000 of their images -> pixels of the images' base tiles.

    Args:
        boxes: [R, 4] x0, y0, x1, y1 in 0-1000.
        image_sizes: [R, 2] (height, width) of each box's image.
        tiled: [R] bool: the image's base tile is squashed (tiled images) or padded to a centred square (not tiled).
        tile_size: S.

    Returns:
        [R, 4] float pixels of the S x S base tile.
    """
    unit = boxes.float() / BOX_SCALE
    height, width = image_sizes[:, 0:1].float(), image_sizes[:, 1:2].float()
    side = torch.maximum(height, width)
    # Padded square: the image sits at ((side - w) // 2, (side - h) // 2) as the image processor pastes it.
    left, top = torch.div(side - width, 2, rounding_mode="floor"), torch.div(side - height, 2, rounding_mode="floor")
    padded_x = (left + unit[:, 0::2] * width) / side
    padded_y = (top + unit[:, 1::2] * height) / side
    squashed = unit
    padded = torch.stack([padded_x[:, 0], padded_y[:, 0], padded_x[:, 1], padded_y[:, 1]], dim=1)
    return torch.where(tiled[:, None], squashed, padded) * tile_size


def region_features(
    encoder: RiceVisionModel, hidden: torch.Tensor, grid: tuple[int, int], boxes: torch.Tensor
) -> torch.Tensor:
    """The region transformer's output for each box, read from an encoder pass already made.

    Args:
        encoder: the RICE tower.
        hidden: [R, 1+HW, D] the last block's output on each box's base tile (every block ran, as in stage 0).
        grid: (h, w) patch grid of the tile.
        boxes: [R, 4] pixels of the base tiles (`boxes_on_base_tile`).

    Returns:
        [R, D_vision], ready for the projector.
    """
    tokens, angles = region_inputs(encoder, hidden, grid)
    masks = box_patch_masks(boxes[:, None], grid, encoder.config.patch_size)  # [R, 1, HW]
    return region_attention(tokens, masks, angles, encoder.config.num_attention_heads)[:, 0]
