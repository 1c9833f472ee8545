"""RICE region head (DESIGN.md section 4): boxes -> patch visibility masks -> masked attention pooling -> projection.

The pooling has no weights (CLS query, patch tokens as keys and values, as in the authors' team's public code), so
one encoder forward serves every region; a region always covers at least one patch.
"""

import math

import torch
from torch import nn


def box_patch_masks(boxes: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Patch visibility masks of boxes.

    Patch (r, c) covers pixels [c*p, (c+1)*p) x [r*p, (r+1)*p); it is visible to a box when its centre
    ((c+0.5)p, (r+0.5)p) lies inside the closed box [x0, x1] x [y0, y1]. Boxes too small to contain any patch
    centre get the patch holding the box centre (clamped to the grid), so no region is empty.

    Args:
        boxes: [B, N, 4] xyxy in pixels of the encoder input (grid[0]*p x grid[1]*p).
        grid: (h, w) patch grid.
        patch_size: p.

    Returns:
        [B, N, h*w] bool, patches in row-major order (the encoder's token order after CLS).
    """
    h, w = grid
    boxes = boxes.float()
    centres_y = (torch.arange(h, device=boxes.device, dtype=torch.float32) + 0.5) * patch_size  # [h]
    centres_x = (torch.arange(w, device=boxes.device, dtype=torch.float32) + 0.5) * patch_size  # [w]
    x0, y0, x1, y1 = (boxes[..., i, None] for i in range(4))  # each [B, N, 1]
    inside_y = (centres_y >= y0) & (centres_y <= y1)  # [B, N, h]
    inside_x = (centres_x >= x0) & (centres_x <= x1)  # [B, N, w]
    masks = (inside_y[..., :, None] & inside_x[..., None, :]).flatten(-2)  # [B, N, h*w]
    row = ((y0 + y1) / 2 / patch_size).floor().long().clamp(0, h - 1)
    col = ((x0 + x1) / 2 / patch_size).floor().long().clamp(0, w - 1)
    return masks.scatter(-1, row * w + col, True)


def masked_attention_pool(last_hidden_state: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Pool patch tokens per region with the CLS token as query: softmax(q.k / sqrt(D)) restricted to the mask.

    Args:
        last_hidden_state: [B, 1+HW, D], CLS first.
        masks: [B, N, HW] bool; every row must have a True entry.

    Returns:
        [B, N, D] region features.
    """
    cls, patches = last_hidden_state[:, :1], last_hidden_state[:, 1:]  # [B, 1, D], [B, HW, D]
    if patches.shape[1] != masks.shape[-1]:
        raise ValueError(f"{patches.shape[1]} patch tokens but masks over {masks.shape[-1]} patches")
    # Scores do not depend on the region: computed once per image, masked per region.
    scores = cls @ patches.transpose(1, 2) / math.sqrt(patches.shape[-1])  # [B, 1, HW]
    scores = scores.masked_fill(~masks, float("-inf"))  # [B, N, HW]
    return torch.softmax(scores, dim=-1) @ patches  # [B, N, D]


def region_features(
    last_hidden_state: torch.Tensor, boxes: torch.Tensor, grid: tuple[int, int], patch_size: int
) -> torch.Tensor:
    """Unprojected region features (also the teacher features of `clusters`): [B, 1+HW, D], [B, N, 4] -> [B, N, D]."""
    return masked_attention_pool(last_hidden_state, box_patch_masks(boxes, grid, patch_size))


class RegionHead(nn.Module):
    """Region pooling followed by a Linear projection to the embedding the cluster losses see.

    Args:
        hidden_size: D of the encoder.
        embed_dim: E of the region embeddings.
    """

    def __init__(self, hidden_size: int, embed_dim: int) -> None:
        super().__init__()
        self.projection = nn.Linear(hidden_size, embed_dim)

    def forward(
        self, last_hidden_state: torch.Tensor, boxes: torch.Tensor, grid: tuple[int, int], patch_size: int
    ) -> torch.Tensor:
        """Args: last_hidden_state [B, 1+HW, D]; boxes [B, N, 4] xyxy pixels of the input; grid (h, w); patch size.

        Returns:
            [B, N, E] region embeddings.
        """
        return self.projection(region_features(last_hidden_state, boxes, grid, patch_size))
