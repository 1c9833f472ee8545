"""RICE's region transformer (DESIGN.md section 4): boxes -> token visibility -> CLS-query attention -> embedding.

As the authors' team's public code does it: one encoder forward, `post_layernorm` on every token, the encoder's heads,
2D RoPE on keys and values (not on the query), the image's CLS as every region's query, and a projection as the only
weight, so the released checkpoint stays the plain ViT.
"""

import torch
from torch import nn

from rice_mllm.vision import RiceVisionModel
from rice_mllm.vision.rice_vit import apply_rotary, axial_rope_angles


def box_patch_masks(boxes: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Token visibility of boxes: the kit's rule for the paper's "sample regions by mask (ROI Align)".

    Patch (r, c) covers pixels [c*p, (c+1)*p) x [r*p, (r+1)*p); it is visible to a box when its centre
    ((c+0.5)p, (r+0.5)p) lies inside the closed box [x0, x1] x [y0, y1], which is where ROI Align's bilinear
    samples of a patch-aligned box would weigh that patch most. A box too small to hold any patch centre (or lying
    outside the grid) sees the one patch holding its own centre, clamped to the grid: no region is ever empty.

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


def mean_region_features(tokens: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean of the patch tokens each region sees: a weight-free region feature for any encoder (teacher labels,
    linear probes), whether or not it has a CLS token.

    Args:
        tokens: [B, T, D] whose last HW tokens are the patches in row-major order (T = HW or 1 + HW).
        masks: [B, N, HW] bool.

    Returns:
        [B, N, D]; a region with no visible patch gives zeros.
    """
    patches = tokens[:, tokens.shape[1] - masks.shape[-1] :]  # [B, HW, D]
    weights = masks.to(patches.dtype)
    return weights @ patches / weights.sum(-1, keepdim=True).clamp(min=1)


def region_attention(
    tokens: torch.Tensor, masks: torch.Tensor, patch_angles: torch.Tensor, num_heads: int
) -> torch.Tensor:
    """Per region and head: softmax over the visible patches of (CLS . rope(k)) / sqrt(d), weighting rope(v).

    Args:
        tokens: [B, 1+HW, D] normalised encoder tokens, CLS first.
        masks: [B, N, HW] bool token visibility.
        patch_angles: [HW, D/heads/2] the encoder's RoPE angles of the patches.
        num_heads: the encoder's heads.

    Returns:
        [B, N, D] the heads' outputs concatenated. A region with no visible patch gives zeros, not NaN.
    """
    batch, length, width = tokens.shape
    head_dim = width // num_heads
    if length - 1 != masks.shape[-1]:
        raise ValueError(f"{length - 1} patch tokens but masks over {masks.shape[-1]} patches")
    query = tokens[:, 0].view(batch, num_heads, 1, head_dim)  # [B, heads, 1, d]
    patches = apply_rotary(tokens[:, 1:].view(batch, length - 1, num_heads, head_dim), patch_angles)
    patches = patches.transpose(1, 2)  # [B, heads, HW, d]: rotated keys, which are also the values
    scores = query @ patches.transpose(-1, -2) * head_dim**-0.5  # [B, heads, 1, HW]: one row serves all regions
    visible = masks.any(-1)  # [B, N]
    # An empty region attends everywhere and is zeroed after: a finite softmax keeps its gradients finite.
    attend = (masks | ~visible[..., None])[:, None]  # [B, 1, N, HW]
    weights = torch.softmax(scores.masked_fill(~attend, float("-inf")), dim=-1)  # [B, heads, N, HW]
    context = (weights @ patches).transpose(1, 2).reshape(batch, -1, width)  # [B, N, D]
    return context * visible[..., None].to(context.dtype)


def encode_for_regions(
    encoder: RiceVisionModel, pixel_values: torch.Tensor, origin: tuple[int, int] = (0, 0)
) -> tuple[torch.Tensor, torch.Tensor]:
    """One encoder forward, then what the region transformer reads (`region_inputs`, with its `origin`).

    Returns:
        tokens [B, 1+HW, D], patch_angles [HW, head_dim/2].
    """
    hidden = encoder(pixel_values).last_hidden_state  # [B, 1+HW, D]
    patch = encoder.config.patch_size
    return region_inputs(encoder, hidden, (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch), origin)


def region_inputs(
    encoder: RiceVisionModel, last_hidden_state: torch.Tensor, grid: tuple[int, int], origin: tuple[int, int] = (0, 0)
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the region transformer reads from an encoder pass already made: `post_layernorm` of every token of the
    last block's output [B, 1+HW, D], and the patches' RoPE angles at the (h, w) patch grid whose top-left patch sits
    at `origin` ((0, 0) but under stage 0's RoPE jitter; the encoder's own pass always starts at (0, 0))."""
    config, body = encoder.config, encoder.vision_model
    angles = axial_rope_angles(
        grid[0],
        grid[1],
        config.hidden_size // config.num_attention_heads,
        float(config.rope_parameters["rope_theta"]),
        body.class_pos_emb,
        origin,
    )
    return body.post_layernorm(last_hidden_state), angles[1:]


class RegionTransformer(nn.Module):
    """Region attention with the encoder's heads, then a Linear projection to the embedding the losses see.

    Args:
        hidden_size: D of the encoder.
        num_heads: the encoder's attention heads (the split of the region attention).
        embed_dim: E of the region embeddings.
    """

    def __init__(self, hidden_size: int, num_heads: int, embed_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.projection = nn.Linear(hidden_size, embed_dim)

    def forward(self, tokens: torch.Tensor, masks: torch.Tensor, patch_angles: torch.Tensor) -> torch.Tensor:
        """Args: tokens [B, 1+HW, D] (`encode_for_regions`); masks [B, N, HW] (`box_patch_masks`); patch_angles.

        Returns:
            [B, N, E] region embeddings.
        """
        return self.projection(region_attention(tokens, masks, patch_angles, self.num_heads))
