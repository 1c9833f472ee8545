"""Boxes in text: Qwen2.5's `<|box_start|>(x0,y0),(x1,y1)<|box_end|>`, integer coordinates normalised to 0-1000.

A box's x is normalised by the image's width and y by its height: x_norm = round(x_px / width * 1000), clamped to
[0, 1000] (Qwen2-VL's convention, the format Qwen2.5's box tokens were trained on). Data records give boxes in pixels
(`"regions"`, one `<region>` placeholder per box); `fill_regions` turns each placeholder into its box text.

Which image a box is measured on:
- the ORIGINAL image, before the processor's anyres resize, padding and tiling: one box text means the same region
  whatever grid the image is cut into (and whatever tile size a later model uses);
- with several images in a sample, the image of the nearest `<image>` placeholder before the box in the conversation,
  counting across turns; a box before any `<image>` refers to nothing and is an error.
Sizes are (height, width), as everywhere in the kit (anyres, image_sizes); boxes are (x0, y0, x1, y1).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence

from rice_mllm.constants import IMAGE_TOKEN

BOX_START, BOX_END = "<|box_start|>", "<|box_end|>"  # Qwen2.5's special tokens for a box
REGION_TOKEN = "<region>"  # placeholder in data records, one per box of `"regions"`, in order
SCALE = 1000  # normalised coordinates run from 0 to SCALE
# Tolerant of spaces inside the box text, strict about the tokens; numbers of 1-4 digits (0-1000 after the check).
_NUMBER = r"\s*(\d{1,4})\s*"
BOX_PATTERN = re.compile(
    re.escape(BOX_START) + rf"\s*\({_NUMBER},{_NUMBER}\)\s*,\s*\({_NUMBER},{_NUMBER}\)\s*" + re.escape(BOX_END)
)
_SPLIT = re.compile(f"({re.escape(IMAGE_TOKEN)}|{re.escape(REGION_TOKEN)})")

Box = tuple[int, int, int, int]


class RegionError(ValueError):
    """A sample's regions do not fit its text or its images (count, order, outside the image, before any image)."""


def is_box(value: object) -> bool:
    """Whether `value` is a list or tuple of 4 finite real numbers (bools excluded): the shape of a pixel box."""
    return (
        isinstance(value, list | tuple)
        and len(value) == 4
        and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    )


def check_box(box: Sequence[float], image_size: Sequence[int]) -> None:
    """Raise ValueError saying what is wrong with a pixel box (x0, y0, x1, y1) on an image of (height, width).

    A box must have x0 < x1 and y0 < y1 and lie within [0, width] x [0, height] (edges included).
    """
    if not is_box(box):
        raise ValueError(f"a box is 4 numbers [x0, y0, x1, y1], got {box!r:.80}")
    x0, y0, x1, y1 = box
    height, width = image_size
    if x0 >= x1 or y0 >= y1:
        raise ValueError(f"box {list(box)} is empty: it needs x0 < x1 and y0 < y1")
    if min(box) < 0 or x1 > width or y1 > height:
        raise ValueError(f"box {list(box)} is outside the {width}x{height} (width x height) image")


def _normalise(value: float, extent: int) -> int:
    return min(SCALE, max(0, round(value / extent * SCALE)))


def box_text(box_px: Sequence[float], image_size: Sequence[int]) -> str:
    """The text of a pixel box (x0, y0, x1, y1) on an image of (height, width).

    Coordinates are clamped to 0-1000, so a box a little outside the image (a detector's) still gives a valid
    text; the data path refuses such boxes first (`check_box`).
    """
    height, width = image_size
    x0, y0, x1, y1 = box_px
    x0, x1 = _normalise(x0, width), _normalise(x1, width)
    y0, y1 = _normalise(y0, height), _normalise(y1, height)
    return f"{BOX_START}({x0},{y0}),({x1},{y1}){BOX_END}"


def _match_box(match: re.Match) -> Box | None:
    box = tuple(int(group) for group in match.groups())
    return box if max(box) <= SCALE else None


def parse_boxes(text: str) -> list[Box]:
    """The normalised boxes (x0, y0, x1, y1) written in `text`, in order; numbers over 1000 are not a box."""
    return [box for match in BOX_PATTERN.finditer(text) if (box := _match_box(match)) is not None]


def replace_boxes(text: str, render: Callable[[Box], str]) -> str:
    """`text` with each box text replaced by `render(normalised box)`; anything else is left as it is."""

    def replace(match: re.Match) -> str:
        box = _match_box(match)
        return match.group(0) if box is None else render(box)

    return BOX_PATTERN.sub(replace, text)


def box_to_pixels(box: Sequence[int], image_size: Sequence[int]) -> Box:
    """A normalised box (x0, y0, x1, y1) in whole pixels of an image of (height, width).

    Rounding to whole pixels keeps a pixel -> text -> pixel round trip within one normalised unit (width / 1000 px).
    """
    height, width = image_size
    x0, y0, x1, y1 = box
    return round(x0 * width / SCALE), round(y0 * height / SCALE), round(x1 * width / SCALE), round(y1 * height / SCALE)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes (x0, y0, x1, y1) in the same coordinates; 0 when the union is empty."""

    def area(x0: float, y0: float, x1: float, y1: float) -> float:
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)

    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a) + area(*b) - inter
    return inter / union if union > 0 else 0.0


def count_regions(messages: Sequence[Mapping[str, str]]) -> int:
    """Number of REGION_TOKEN placeholders in the messages' contents."""
    return sum(str(message.get("content", "")).count(REGION_TOKEN) for message in messages)


def _region_text(index: int, box: Sequence[float], image: int, image_sizes: Sequence[Sequence[int]]) -> str:
    """Box text of region `index` on image `image` (-1: no image before it), or RegionError naming the region."""
    if image < 0:
        raise RegionError(f"region {index}: its {REGION_TOKEN} comes before any {IMAGE_TOKEN}")
    if image >= len(image_sizes):
        raise RegionError(f"region {index}: on image {image}, but the sample has {len(image_sizes)} image(s)")
    try:
        check_box(box, image_sizes[image])
    except ValueError as error:
        raise RegionError(f"region {index} (on image {image}): {error}") from None
    return box_text(box, image_sizes[image])


def fill_regions(
    messages: Sequence[Mapping[str, str]], regions: Sequence[Sequence[float]], image_sizes: Sequence[Sequence[int]]
) -> list[dict[str, str]]:
    """The messages with the i-th `<region>` replaced by the box text of regions[i] (pixels).

    Each box is measured on the image of the nearest `<image>` before it (see the module docstring); image_sizes are
    (height, width) in placeholder order.

    Raises:
        RegionError: placeholder count != len(regions), a box before any `<image>`, a box that is empty or outside
            its image; the message names the region's index.
    """
    placeholders = count_regions(messages)
    if placeholders != len(regions):
        raise RegionError(f"wrong count: {placeholders} {REGION_TOKEN} placeholder(s) but {len(regions)} region(s)")
    filled, images, index = [], 0, 0
    for message in messages:
        parts = _SPLIT.split(str(message.get("content", "")))
        for position, part in enumerate(parts):
            if part == IMAGE_TOKEN:
                images += 1
            elif part == REGION_TOKEN:
                parts[position] = _region_text(index, regions[index], images - 1, image_sizes)
                index += 1
        filled.append({**message, "content": "".join(parts)})
    return filled


def mark_regions(
    messages: Sequence[Mapping[str, str]], marker: str
) -> tuple[list[dict[str, str]], list[Box], list[int]]:
    """Each box text of a user turn followed by `marker` (a model's region token), for region features.

    Boxes in assistant turns stay text: the model writes those, nobody gives it their features.

    Returns:
        the marked messages; the user turns' boxes (normalised), in order; the index of each box's image (the nearest
        `<image>` before it, as in `fill_regions`).

    Raises:
        RegionError: a user turn's box before any `<image>`.
    """
    marked, boxes, owners, images = [], [], [], 0
    pattern = re.compile(f"{re.escape(IMAGE_TOKEN)}|{BOX_PATTERN.pattern}")
    for message in messages:
        user = message.get("role") == "user"

        def mark(match: re.Match, user: bool = user) -> str:
            nonlocal images
            if match.group(0) == IMAGE_TOKEN:
                images += 1
                return match.group(0)
            box = _match_box(match)
            if not user or box is None:
                return match.group(0)
            if images == 0:
                raise RegionError(f"box {len(boxes)} of the user turns comes before any {IMAGE_TOKEN}")
            boxes.append(box)
            owners.append(images - 1)
            return match.group(0) + marker

        marked.append({**message, "content": pattern.sub(mark, str(message.get("content", "")))})
    return marked, boxes, owners
