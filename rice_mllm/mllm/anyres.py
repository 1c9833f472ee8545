"""LLaVA-NeXT anyres geometry: grid choice, tiles, unpadded feature grid, image_newline, OneVision token budget,
and which images of a multi-image sample are tiled at all.

Follows transformers' conventions (sizes are (height, width), its unpad rounding, OneVision's `anyres_max_K`).
Invariant: `num_image_tokens` is the only token count; `pack_image_features` returns exactly that many rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

Size = tuple[int, int]  # (height, width)
MULTI_IMAGE_TILINGS = ("anyres", "base")
# The kit's defaults, restated nowhere else: LLaVA-NeXT's "up to 2x2+1" grids, and every image of a sample tiled.
DEFAULT_MAX_TILES = 4
DEFAULT_MULTI_IMAGE_TILING = "anyres"


def _as_size(image_size) -> Size:
    """(height, width) as Python ints: the model passes rows of an image_sizes tensor."""
    height, width = image_size
    return int(height), int(width)


@dataclass(frozen=True)
class AnyresGeometry:
    """How images become tiles and tokens.

    Args:
        tile_size: side S of one square tile, the vision encoder's input size.
        patch_size: encoder patch size; a tile gives N x N features, N = S // patch_size.
        image_grid_pinpoints: candidate canvas sizes (height, width), multiples of `tile_size`.
        max_grid_tiles: OneVision's K in `anyres_max_K`: the unpadded grid is bilinearly shrunk when its
            area exceeds K * N^2 by more than 1.1^2. None keeps plain LLaVA-NeXT.
        multi_image_tiling: how the images of a sample with several images are cut. "anyres": each is tiled as
            if it were alone (transformers' LLaVA-NeXT classes). "base": each is padded to a square of the mean
            colour and gives its base tile only, plus one image_newline (N^2 + 1 tokens), as LLaVA-NeXT's training
            code ("pad" for multi-image samples) and LLaVA-OneVision (transformers' `batch_num_images`) do: half
            the tokens or fewer per image, where the question is about comparing images rather than detail.
        spatial_merge_size: patches per side that one token stands for (2: LLaVA-OneVision-1.5's patch merger); a
            tile gives (N / spatial_merge_size)^2 tokens and the grid's unpadding and newlines count merged tokens.
    """

    tile_size: int
    patch_size: int
    image_grid_pinpoints: tuple[Size, ...] = field(default=())
    max_grid_tiles: int | None = None
    multi_image_tiling: str = DEFAULT_MULTI_IMAGE_TILING
    spatial_merge_size: int = 1

    def __post_init__(self) -> None:
        if self.tile_size <= 0 or self.patch_size <= 0 or self.tile_size % self.patch_size:
            raise ValueError(f"tile_size {self.tile_size} must be a positive multiple of patch_size {self.patch_size}")
        if self.spatial_merge_size < 1 or (self.tile_size // self.patch_size) % self.spatial_merge_size:
            raise ValueError(
                f"a tile's {self.tile_size // self.patch_size} patches a side do not divide into blocks of "
                f"spatial_merge_size {self.spatial_merge_size}"
            )
        pinpoints = tuple((int(h), int(w)) for h, w in self.image_grid_pinpoints)
        if not pinpoints:
            raise ValueError("image_grid_pinpoints is empty: give at least one (height, width) canvas")
        bad = [p for p in pinpoints if p[0] <= 0 or p[1] <= 0 or p[0] % self.tile_size or p[1] % self.tile_size]
        if bad:
            raise ValueError(f"pinpoints {bad} are not positive multiples of tile_size {self.tile_size}")
        if self.max_grid_tiles is not None and self.max_grid_tiles < 1:
            raise ValueError(f"max_grid_tiles must be >= 1 or None, got {self.max_grid_tiles}")
        if self.multi_image_tiling not in MULTI_IMAGE_TILINGS:
            raise ValueError(
                f"multi_image_tiling must be one of {MULTI_IMAGE_TILINGS}, got {self.multi_image_tiling!r}"
            )
        # Frozen dataclass: normalise lists from JSON into hashable tuples.
        object.__setattr__(self, "image_grid_pinpoints", pinpoints)

    @property
    def tile_features(self) -> int:
        """N: tokens per tile side (patches per side over spatial_merge_size)."""
        return self.tile_size // self.patch_size // self.spatial_merge_size

    def tiles_images_of(self, num_images: int) -> bool:
        """Whether the images of a sample holding `num_images` images are tiled (True) or give their base tile only."""
        return num_images == 1 or self.multi_image_tiling == "anyres"

    def to_dict(self) -> dict:
        return {
            "tile_size": self.tile_size,
            "patch_size": self.patch_size,
            "image_grid_pinpoints": [list(p) for p in self.image_grid_pinpoints],
            "max_grid_tiles": self.max_grid_tiles,
            "multi_image_tiling": self.multi_image_tiling,
            "spatial_merge_size": self.spatial_merge_size,
        }

    @classmethod
    def from_dict(cls, data: dict) -> AnyresGeometry:
        unknown = set(data) - {
            "tile_size",
            "patch_size",
            "image_grid_pinpoints",
            "max_grid_tiles",
            "multi_image_tiling",
            "spatial_merge_size",
        }
        if unknown:
            raise KeyError(f"unknown anyres geometry keys {sorted(unknown)}")
        return cls(**data)


def make_grid_pinpoints(tile_size: int, max_tiles: int = DEFAULT_MAX_TILES, min_tiles: int = 1) -> list[Size]:
    """All canvases of `rows x cols` tiles with min_tiles <= rows*cols <= max_tiles, rows-major order.

    E.g. tile 336, max 4: 1x1, 1x2, 1x3, 1x4, 2x1, 2x2, 3x1, 4x1 (as pixel sizes). Replaces the
    "(1x1),...,(6x6)" shorthand, which only knows a few tile sizes. Order matters: ties go to the first.
    """
    return [
        (rows * tile_size, cols * tile_size)
        for rows in range(1, max_tiles + 1)
        for cols in range(1, max_tiles // rows + 1)
        if rows * cols >= min_tiles
    ]


def select_best_resolution(image_size: Size, pinpoints: Sequence[Sequence[int]]) -> Size:
    """Pick the canvas that keeps most of the image's pixels, then wastes least, then comes first.

    Args:
        image_size: (height, width) of the original image.
        pinpoints: candidate (height, width) canvases.

    Returns:
        The chosen (height, width).
    """
    height, width = _as_size(image_size)
    best, best_key = None, None
    for cand_h, cand_w in pinpoints:
        # Float scale and int() truncation on purpose: transformers computes it so, and the
        # grid choice must agree with it bit for bit on near-ties.
        scale = min(cand_w / width, cand_h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        key = (kept, -(cand_h * cand_w - kept))
        if best_key is None or key > best_key:
            best, best_key = (int(cand_h), int(cand_w)), key
    return best


def grid_shape(image_size: Size, geometry: AnyresGeometry) -> Size:
    """(rows, cols) of grid tiles for an image, excluding the base tile."""
    canvas_h, canvas_w = select_best_resolution(image_size, geometry.image_grid_pinpoints)
    return canvas_h // geometry.tile_size, canvas_w // geometry.tile_size


def num_tiles(image_size: Size, geometry: AnyresGeometry, tiled: bool = True) -> int:
    """Tiles the image processor emits for one image: the base tile plus rows * cols grid tiles (when `tiled`)."""
    if not tiled:
        return 1
    rows, cols = grid_shape(image_size, geometry)
    return 1 + rows * cols


def fit_size(image_size: Size, canvas: Size) -> Size:
    """Size of the image resized (aspect kept) to fit inside `canvas`; the long fit side fills the canvas.

    The other side is rounded up and capped at the canvas; the float product (not exact integer maths) is
    deliberate so that the resized size, hence the pixels, equal transformers' `get_patch_output_size`.
    """
    height, width = image_size
    canvas_h, canvas_w = canvas
    if canvas_w / width < canvas_h / height:  # width limits the scale
        return min(math.ceil(height * (canvas_w / width)), canvas_h), canvas_w
    return canvas_h, min(math.ceil(width * (canvas_h / height)), canvas_w)


def unpadded_crop(image_size: Size, grid_size: Size) -> tuple[int, int, int, int]:
    """Rows/cols of a padded feature grid that hold the image (the inverse of the centred padding).

    Args:
        image_size: (height, width) of the original image.
        grid_size: (height, width) of the padded feature grid.

    Returns:
        (top, bottom, left, right): keep grid[top:bottom, left:right]. The margin is the floor of half the
        padding on both sides, as in transformers' `unpad_image`.
    """
    height, width = image_size
    grid_h, grid_w = grid_size
    # Exact integer floors; transformers' int(round(x, 7)) of the float product gives the same value for
    # any side under ~10^7 px (a fraction k/width cannot come within 1e-7 of the next integer).
    if width * grid_h > grid_w * height:  # image wider than the grid: padding above and below
        margin = (grid_h - (height * grid_w) // width) // 2
        return margin, grid_h - margin, 0, grid_w
    margin = (grid_w - (width * grid_h) // height) // 2
    return 0, grid_h, margin, grid_w - margin


def budget_size(grid_size: Size, geometry: AnyresGeometry) -> Size:
    """Feature-grid size after the OneVision `anyres_max_K` budget (identity when max_grid_tiles is None)."""
    if geometry.max_grid_tiles is None:
        return grid_size
    grid_h, grid_w = grid_size
    ratio = math.sqrt(grid_h * grid_w / (geometry.max_grid_tiles * geometry.tile_features**2))
    # OneVision only shrinks past a 10% overshoot, and floors with float division.
    if ratio > 1.1:
        return int(grid_h // ratio), int(grid_w // ratio)
    return grid_size


@dataclass(frozen=True)
class FeatureLayout:
    """Where one image's tokens come from: grid tiles, the crop of their feature grid, its final size."""

    rows: int
    cols: int
    crop: tuple[int, int, int, int]
    final_size: Size

    @property
    def num_grid_tokens(self) -> int:
        """Unpadded (and budgeted) grid features plus one image_newline per row."""
        return self.final_size[0] * (self.final_size[1] + 1)


def feature_layout(image_size: Size, geometry: AnyresGeometry) -> FeatureLayout:
    """The single derivation of an image's feature layout; count and packing both read it."""
    image_size = _as_size(image_size)
    if min(image_size) <= 0:
        raise ValueError(f"image size {image_size} must be positive (height, width)")
    rows, cols = grid_shape(image_size, geometry)
    n = geometry.tile_features
    crop = unpadded_crop(image_size, (rows * n, cols * n))
    top, bottom, left, right = crop
    final = budget_size((bottom - top, right - left), geometry)
    return FeatureLayout(rows, cols, crop, final)


def num_image_tokens(image_size: Size, geometry: AnyresGeometry, tiled: bool = True) -> int:
    """Number of `<image>` tokens one image takes: N^2 (base tile, CLS dropped) + Hf * (Wf + 1), or N^2 + 1 (one
    image_newline) when not `tiled`.

    Args:
        image_size: (height, width) of the original image in pixels.
        geometry: tiling and budget settings.
        tiled: False for an image that gives its base tile only (see `AnyresGeometry.tiles_images_of`).
    """
    if not tiled:
        return geometry.tile_features**2 + 1
    return geometry.tile_features**2 + feature_layout(image_size, geometry).num_grid_tokens


def pack_image_features(
    tile_features: torch.Tensor,
    image_size: Size,
    geometry: AnyresGeometry,
    image_newline: torch.Tensor,
    tiled: bool = True,
) -> torch.Tensor:
    """Arrange one image's tile features into its token sequence.

    Args:
        tile_features: [1 + T, N*N, D] features of the base tile then the grid tiles (row-major), CLS dropped;
            [1, N*N, D] when not `tiled`.
        image_size: (height, width) of the original image.
        geometry: tiling and budget settings.
        image_newline: [D] learned vector appended after each row of the grid.
        tiled: False for an image that gives its base tile only.

    Returns:
        [num_image_tokens(image_size, geometry, tiled), D]: base features, then the unpadded (budgeted) grid
        row by row, each row followed by image_newline; untiled, the base features and one image_newline.
    """
    layout = feature_layout(image_size, geometry)
    n = geometry.tile_features
    expected = (1 + layout.rows * layout.cols if tiled else 1, n * n)
    if tuple(tile_features.shape[:2]) != expected:
        tiles = f"{layout.rows}x{layout.cols} grid + base tile" if tiled else "base tile only"
        raise ValueError(
            f"image {_as_size(image_size)}: expected tile features of shape [{expected[0]}, {expected[1]}, D] "
            f"({tiles}, {n}x{n} features each), got {list(tile_features.shape)}"
        )
    dim = tile_features.shape[-1]
    base = tile_features[0]  # [N*N, D]
    if not tiled:
        return torch.cat([base, image_newline.to(base.dtype)[None]], dim=0)
    grid = tile_features[1:].reshape(layout.rows, layout.cols, n, n, dim)
    grid = grid.permute(0, 2, 1, 3, 4).reshape(layout.rows * n, layout.cols * n, dim)  # [rows*N, cols*N, D]
    top, bottom, left, right = layout.crop
    grid = grid[top:bottom, left:right]
    if tuple(grid.shape[:2]) != layout.final_size:
        # Budget: interpolate channels-first, as OneVision does (bilinear, align_corners=False).
        grid = F.interpolate(grid.permute(2, 0, 1)[None], size=layout.final_size, mode="bilinear")
        grid = grid[0].permute(1, 2, 0)
    height = grid.shape[0]
    newline = image_newline.to(grid.dtype).expand(height, 1, dim)
    grid = torch.cat([grid, newline], dim=1).reshape(-1, dim)  # [Hf*(Wf+1), D]
    return torch.cat([base, grid], dim=0)
