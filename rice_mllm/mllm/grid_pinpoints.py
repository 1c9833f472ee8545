"""`image_grid_pinpoints` as LLaVA-NeXT and OneVision write it: pixel lists, grid strings, `anyres_max_N`, presets.

Every form becomes (height, width) canvases in transformers' reading, multiples of the tile. Invariant: a setting
means one thing; two settings that could disagree (a grid list and `max_tiles`, `anyres_max_N` and a budget) raise.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence

from .anyres import DEFAULT_MAX_TILES, Size, make_grid_pinpoints

# LLaVA-NeXT 1.6's grids ("up to 2x2+1"), rows x cols, in the order of its released `image_grid_pinpoints`
# ([[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]] at 336 px): no 1x1, no 1x4. The order
# breaks ties (a square image gets the first of 1x2 and 2x1), so it is kept.
GRID_PRESETS: dict[str, tuple[tuple[int, int], ...]] = {
    "llava-next": ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3)),
}
# LLaVA-OneVision pairs `image_aspect_ratio: anyres_max_N` with the grids "(1x1),...,(6x6)" (transformers'
# LlavaOnevisionConfig default), so `anyres_max_N` here means those grids and a budget of N tiles.
ONEVISION_GRIDS = "(1x1),...,(6x6)"
_GRID = r"\((\d+)x(\d+)\)"
_GRID_STRING = re.compile(rf"{_GRID}(?:,\.\.\.,{_GRID})?")
_ANYRES_MAX = re.compile(r"anyres_max_(\d+)")
FORMS = (
    f"a list of [height, width] pixel canvases, a preset ({', '.join(sorted(GRID_PRESETS))}), "
    "a grid string '(AxB)' or '(AxB),...,(CxD)' (rows x cols), or 'anyres_max_N'"
)


def grid_range(first: tuple[int, int], last: tuple[int, int], tile_size: int) -> list[Size]:
    """LLaVA's "(AxB),...,(CxD)": every rows x cols grid with A <= rows <= C and B <= cols <= D, rows-major, in pixels.

    LLaVA-NeXT's repo reads the pairs as (width, height) and accepts only 224-512 px tiles; the kit reads them as
    transformers' converted configs do, (height, width), and scales to any tile: "(1x1),...,(6x6)" at 384 px is
    transformers' LlavaOnevisionConfig default list, in its order.
    """
    (row_0, col_0), (row_1, col_1) = first, last
    if not (1 <= row_0 <= row_1 and 1 <= col_0 <= col_1):
        raise ValueError(f"grid range ({row_0}x{col_0}),...,({row_1}x{col_1}) is empty or not positive")
    rows, cols = range(row_0, row_1 + 1), range(col_0, col_1 + 1)
    return [(r * tile_size, c * tile_size) for r in rows for c in cols]


def parse_grid_pinpoints(spec: str | Sequence[Sequence[int]], tile_size: int) -> tuple[list[Size], int | None]:
    """The canvases a setting names, and the token budget it carries (`anyres_max_N`: N; otherwise None).

    Args:
        spec: see FORMS; a string holding a Python/JSON list ("[[336, 672], ...]", as LLaVA's configs may store it)
            is read as that list.
        tile_size: the vision encoder's input size S; grids are scaled by it.

    Returns:
        ([(height, width), ...], max_grid_tiles or None).
    """
    if isinstance(spec, str):
        text = spec.replace(" ", "")
        if text in GRID_PRESETS:
            return [(r * tile_size, c * tile_size) for r, c in GRID_PRESETS[text]], None
        if match := _ANYRES_MAX.fullmatch(text):
            return parse_grid_pinpoints(ONEVISION_GRIDS, tile_size)[0], int(match.group(1))
        if match := _GRID_STRING.fullmatch(text):
            first = (int(match.group(1)), int(match.group(2)))
            last = (int(match.group(3)), int(match.group(4))) if match.group(3) else first
            return grid_range(first, last, tile_size), None
        if text.startswith("["):
            try:
                spec = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise ValueError(f"image_grid_pinpoints {spec!r} is not a list of [height, width] pairs") from None
        else:
            raise ValueError(f"image_grid_pinpoints {spec!r} is not understood: give {FORMS}")
    pairs = [tuple(pair) for pair in spec]
    if not pairs or any(len(pair) != 2 or not all(isinstance(x, int) for x in pair) for pair in pairs):
        raise ValueError(f"image_grid_pinpoints {spec!r} is not a non-empty list of [height, width] integer pairs")
    return [(int(h), int(w)) for h, w in pairs], None


def resolve_grid(
    tile_size: int,
    image_grid_pinpoints: str | Sequence[Sequence[int]] | None = None,
    max_tiles: int | None = None,
    max_grid_tiles: int | None = None,
) -> tuple[list[Size], int | None]:
    """Canvases and token budget from the settings that may name them; at most one of the first two is given.

    Args:
        tile_size: the vision encoder's input size.
        image_grid_pinpoints: any form of `parse_grid_pinpoints`.
        max_tiles: every grid of at most this many tiles (`make_grid_pinpoints`).
        max_grid_tiles: OneVision's budget K; `anyres_max_N` also sets it, and the two must then agree.
        With neither grid setting, every grid of at most DEFAULT_MAX_TILES tiles.

    Returns:
        ([(height, width), ...], max_grid_tiles or None).
    """
    if image_grid_pinpoints is not None and max_tiles is not None:
        raise ValueError(
            f"image_grid_pinpoints={image_grid_pinpoints!r} and max_tiles={max_tiles} both name the grids: give one "
            "(set the other to null)"
        )
    if image_grid_pinpoints is None:
        return make_grid_pinpoints(tile_size, DEFAULT_MAX_TILES if max_tiles is None else max_tiles), max_grid_tiles
    pinpoints, budget = parse_grid_pinpoints(image_grid_pinpoints, tile_size)
    if budget is not None and max_grid_tiles is not None and budget != max_grid_tiles:
        raise ValueError(
            f"image_grid_pinpoints={image_grid_pinpoints!r} sets a budget of {budget} tiles but max_grid_tiles is "
            f"{max_grid_tiles}: give one"
        )
    return pinpoints, max_grid_tiles if budget is None else budget
