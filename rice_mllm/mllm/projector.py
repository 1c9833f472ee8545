"""Projectors from vision features to the LLM's embedding space: LLaVA's `mlp2x_gelu` (one token per patch, names as
transformers' LLaVA classes), LLaVA-OneVision-1.5's patch merger (one token per 2x2 block of patches, names as
transformers' `LlavaOnevision15VisionPatchMerger`), and `mlp2x_gelu_block`, mlp2x_gelu plus the merger's view of each
block (one token per patch)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

PROJECTOR_TYPES = ("mlp2x_gelu", "patch_merger", "mlp2x_gelu_block")
DEFAULT_PROJECTOR_TYPE = "mlp2x_gelu"  # LLaVA's, and what a config written before the choice existed has
PATCH_MERGER_SIZE = 2  # LLaVA-OneVision-1.5's (and Qwen2-VL's) spatial_merge_size
BLOCK_TERM_SCALE = 0.25  # mlp2x_gelu_block's fixed factor on its block term (BlockContextProjector says why)


def spatial_merge_size(projector_type: str) -> int:
    """Patches per side that one image token stands for: 2 for `patch_merger`, else 1."""
    if projector_type not in PROJECTOR_TYPES:
        raise ValueError(f"unknown projector_type {projector_type!r}; choose one of {list(PROJECTOR_TYPES)}")
    return PATCH_MERGER_SIZE if projector_type == "patch_merger" else 1


class MultiModalProjector(nn.Module):
    """LLaVA's `mlp2x_gelu`: Linear(vision, llm) -> activation -> Linear(llm, llm), both with bias.

    Args:
        vision_hidden_size: width of the encoder's features.
        text_hidden_size: width of the LLM's embeddings.
        hidden_act: activation name; "gelu" is the exact GELU of `mlp2x_gelu`.
    """

    def __init__(self, vision_hidden_size: int, text_hidden_size: int, hidden_act: str = "gelu"):
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden_size, text_hidden_size)
        self.act = ACT2FN[hidden_act]
        self.linear_2 = nn.Linear(text_hidden_size, text_hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[tiles, N*N, vision_hidden] (or [R, vision_hidden]) -> [..., text_hidden]."""
        return self.linear_2(self.act(self.linear_1(features)))

    def project_regions(self, features: torch.Tensor) -> torch.Tensor:
        """[R, vision_hidden] region features -> [R, text_hidden]."""
        return self(features)


def merge_patches(features: torch.Tensor, merge: int = PATCH_MERGER_SIZE) -> torch.Tensor:
    """[tiles, N*N, D] row-major patch grids -> [tiles, (N/merge)^2, merge*merge*D]: each merge x merge block of
    patches concatenated, row by row within the block, the blocks in row-major order (Qwen2-VL's merge order)."""
    tiles, count, dim = features.shape
    side = round(count**0.5)
    if side * side != count or side % merge:
        raise ValueError(f"{count} patches per tile are not a square grid whose side divides by {merge}")
    blocks = features.reshape(tiles, side // merge, merge, side // merge, merge, dim).permute(0, 1, 3, 2, 4, 5)
    return blocks.reshape(tiles, (side // merge) ** 2, merge * merge * dim)


def unmerge_patches(blocks: torch.Tensor, merge: int = PATCH_MERGER_SIZE) -> torch.Tensor:
    """The inverse of `merge_patches`: [tiles, B*B, merge*merge*D] -> [tiles, (B*merge)^2, D] row-major."""
    tiles, count, width = blocks.shape
    side, dim = round(count**0.5), width // (merge * merge)
    patches = blocks.reshape(tiles, side, side, merge, merge, dim).permute(0, 1, 3, 2, 4, 5)
    return patches.reshape(tiles, (side * merge) ** 2, dim)


class PatchMergerProjector(nn.Module):
    """LLaVA-OneVision-1.5's patch merger: LayerNorm per patch, the 2x2 block's patches concatenated, then
    Linear(4D, 4D) -> GELU -> Linear(4D, llm). A quarter of the image tokens of `mlp2x_gelu`, and each token holds
    where in its block each part of an object lies in fixed channels instead of in which of four tokens it is.

    Region features (one per box, `region_tokens`) are D wide; each enters as a block of four equal patches, so region
    tokens and image tokens share one projection and one embedding space.

    Args:
        vision_hidden_size: width D of the encoder's features.
        text_hidden_size: width of the LLM's embeddings.
        layer_norm_eps: the LayerNorm's epsilon (LLaVA-OneVision-1.5's vision `layer_norm_eps`).
    """

    def __init__(self, vision_hidden_size: int, text_hidden_size: int, layer_norm_eps: float = 1e-5):
        super().__init__()
        merged = vision_hidden_size * PATCH_MERGER_SIZE**2
        self.norm = nn.LayerNorm(vision_hidden_size, eps=layer_norm_eps)
        self.linear_fc1 = nn.Linear(merged, merged)
        self.act_fn = nn.GELU()
        self.linear_fc2 = nn.Linear(merged, text_hidden_size)

    def _project(self, merged: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act_fn(self.linear_fc1(merged)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[tiles, N*N, D] row-major patch grids -> [tiles, (N/2)^2, text_hidden]."""
        return self._project(merge_patches(self.norm(features)))

    def project_regions(self, features: torch.Tensor) -> torch.Tensor:
        """[R, D] region features -> [R, text_hidden]."""
        return self._project(self.norm(features).repeat(1, PATCH_MERGER_SIZE**2))


class BlockContextProjector(MultiModalProjector):
    """`mlp2x_gelu_block`: LLaVA's mlp2x_gelu on each patch, plus a term that sees the patch's whole 2x2 block.

    The block term is the patch merger's view (the block's patches side by side, Linear(4D, 4L) -> GELU ->
    Linear(4L, 4L), L the LLM's width), split back into the block's four tokens and added to theirs. Why: a box's
    edges fall inside patches, so writing one needs where within a block an object's parts lie; with one token per
    patch that is only in which token is which, and attention pools tokens. The merger puts it in fixed channels but
    gives a block one token whose weights are not shared across the block's places, and the per-patch term keeps
    what mlp2x_gelu reads the same wherever an object falls. Same token count and layout as mlp2x_gelu. The block
    term's output layer starts at zero, so a new projector computes mlp2x_gelu.

    The block term's output is multiplied by a fixed 0.25 (`BLOCK_TERM_SCALE`). Under Adam a step moves each weight
    by about the learning rate whatever its gradient, so the factor gives the term about a quarter of the learning
    rate without a parameter group the trainer would have to know of. Unscaled, the term trained unstably: one of
    four tiny-world seeds fell to 56.8% of its held-out answers; scaled, none fell below 85% (README, grounding).

    Region features enter the block term as a block of four equal patches; the region token adds the mean of the
    four outputs.
    """

    def __init__(self, vision_hidden_size: int, text_hidden_size: int, hidden_act: str = "gelu"):
        super().__init__(vision_hidden_size, text_hidden_size, hidden_act)
        blocks = PATCH_MERGER_SIZE**2
        self.block_fc1 = nn.Linear(blocks * vision_hidden_size, blocks * text_hidden_size)
        self.block_fc2 = nn.Linear(blocks * text_hidden_size, blocks * text_hidden_size)
        nn.init.zeros_(self.block_fc2.weight)
        nn.init.zeros_(self.block_fc2.bias)

    def _block_term(self, merged: torch.Tensor) -> torch.Tensor:
        return BLOCK_TERM_SCALE * self.block_fc2(self.act(self.block_fc1(merged)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[tiles, N*N, vision_hidden] row-major patch grids (N even) -> [tiles, N*N, text_hidden]."""
        return super().forward(features) + unmerge_patches(self._block_term(merge_patches(features)))

    def project_regions(self, features: torch.Tensor) -> torch.Tensor:
        """[R, vision_hidden] region features -> [R, text_hidden]."""
        block = self._block_term(features.repeat(1, PATCH_MERGER_SIZE**2))
        return super().forward(features) + block.reshape(len(features), PATCH_MERGER_SIZE**2, -1).mean(1)


def build_projector(
    projector_type: str,
    vision_hidden_size: int,
    text_hidden_size: int,
    hidden_act: str,
    layer_norm_eps: float,
    patches_per_side: int,
) -> nn.Module:
    """The projector `projector_type` names (`PROJECTOR_TYPES`; an unknown name, or a block projector on tiles of an
    odd number of patches a side, raises)."""
    if spatial_merge_size(projector_type) > 1:
        return PatchMergerProjector(vision_hidden_size, text_hidden_size, layer_norm_eps)
    if projector_type == "mlp2x_gelu_block":
        if patches_per_side % PATCH_MERGER_SIZE:
            raise ValueError(
                f"projector_type 'mlp2x_gelu_block' needs tiles of an even number of patches a side; the encoder's "
                f"tiles have {patches_per_side}"
            )
        return BlockContextProjector(vision_hidden_size, text_hidden_size, hidden_act)
    return MultiModalProjector(vision_hidden_size, text_hidden_size, hidden_act)
