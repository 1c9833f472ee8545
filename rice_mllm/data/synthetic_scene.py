"""Scenes of the embedded tiny world: coloured shapes and one rendered word on a plain background (DESIGN.md section 6).

Invariant: a scene is a pure function of its `random.Random`; rendering is deterministic and every reported box is the
tight pixel box of what was drawn (half-open xyxy), inside the image and inside the object's 3x3 grid cell.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

# Saturated colours, far apart in RGB and from every background and the ink, so a pixel identifies its object.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 20),
    "purple": (140, 40, 180),
    "orange": (250, 120, 10),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond")
SHAPE_PLURALS: dict[str, str] = {shape: shape + "s" for shape in SHAPES}
# Short, distinct words; none is a colour or shape name, so reading answers never collide with the other types.
WORDS: tuple[str, ...] = (
    "cat", "dog", "sun", "tree", "book", "fish", "bird", "car", "house", "moon",
    "apple", "boat", "cake", "door", "egg", "frog", "hat", "key", "lamp", "milk",
    "pen", "rain", "ship", "cup", "box", "bus", "map", "owl", "pig", "bell",
    "kite", "leaf",
)  # fmt: skip
BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((255, 255, 255), (232, 232, 232), (250, 243, 225), (225, 235, 250))
INK: tuple[int, int, int] = (20, 20, 20)
# Names of the 3x3 grid cells, indexed [row][column].
POSITIONS: tuple[tuple[str, ...], ...] = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
MIN_SIDE = 64  # below this a grid cell is under 21 px and small stars look like diamonds
MIN_SHAPE = 14  # smallest shape side in pixels: under ~12 px a star and a diamond rasterise alike

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class WorldConfig:
    """Knobs of the scene sampler.

    Args:
        min_side: smallest image side in pixels (each side is drawn independently, so aspect ratios vary).
        max_side: largest image side in pixels.
        max_objects: most shapes per image (at least one is always drawn).
        word_prob: probability that an image carries a word.
        word_grid: 0 sets words freely (random size and pixel offset). N > 0 typesets them: one font size,
            `word_size`, with the text anchor on multiples of N px. With N = the encoder's patch size and images of
            one tile, a word is then the same patch pattern wherever it stands, so reading it is learnable from a
            few thousand examples; set freely, a from-scratch 16 px encoder hardly learnt to read held-out words.
        word_size: font size in pixels of typeset words (word_grid > 0).
    """

    min_side: int = 112
    max_side: int = 224
    max_objects: int = 4
    word_prob: float = 0.75
    word_grid: int = 0
    word_size: int = 28

    def __post_init__(self) -> None:
        if not MIN_SIDE <= self.min_side <= self.max_side:
            raise ValueError(f"need {MIN_SIDE} <= min_side <= max_side, got {self.min_side}, {self.max_side}")
        if not 1 <= self.max_objects <= 6:
            # A word takes a whole row of the 3x3 grid, leaving 6 cells for shapes.
            raise ValueError(f"max_objects must be in [1, 6], got {self.max_objects}")
        if not 0.0 <= self.word_prob <= 1.0:
            raise ValueError(f"word_prob must be in [0, 1], got {self.word_prob}")
        if self.word_grid < 0 or self.word_size < 6:
            raise ValueError(f"need word_grid >= 0 and word_size >= 6, got {self.word_grid}, {self.word_size}")


DEFAULT_WORLD = WorldConfig()


@dataclass(frozen=True)
class SceneObject:
    """A filled shape drawn inside the square (x, y, x + size, y + size) of grid cell (row, col)."""

    colour: str
    shape: str
    row: int
    col: int
    x: int
    y: int
    size: int

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def position(self) -> str:
        return POSITIONS[self.row][self.col]


@dataclass(frozen=True)
class SceneWord:
    """A word in INK whose text anchor (left, top) is (x, y); it owns the whole grid row `row`."""

    text: str
    row: int
    x: int
    y: int
    font_size: int


@dataclass(frozen=True)
class Scene:
    """Everything needed to render one image and to phrase questions about it."""

    width: int
    height: int
    background: tuple[int, int, int]
    objects: tuple[SceneObject, ...]
    word: SceneWord | None


@dataclass(frozen=True)
class RenderedScene:
    """A rendered scene with tight pixel boxes (half-open xyxy), aligned with `scene.objects` and `scene.word`."""

    image: Image.Image
    object_boxes: tuple[Box, ...]
    word_box: Box | None


def _cell_bounds(width: int, height: int, row: int, col: int) -> Box:
    """Integer pixel range of a grid cell, 1 px inside the real-valued thirds: centres classify unambiguously and
    drawings in neighbouring cells never touch."""
    return (
        math.ceil(col * width / 3) + 1,
        math.ceil(row * height / 3) + 1,
        math.floor((col + 1) * width / 3) - 1,
        math.floor((row + 1) * height / 3) - 1,
    )


def _font(size: int) -> ImageFont.FreeTypeFont:
    # Pillow's embedded font: no font file to ship, same glyphs on every machine with the same Pillow.
    return ImageFont.load_default(size=size)


def _typeset_word(rng: random.Random, text: str, row: int, row_box: Box, config: WorldConfig) -> SceneWord:
    """`text` at config.word_size, anchored on the word_grid with its ink inside `row_box` (grid row `row`)."""
    x0, y0, x1, y1 = row_box
    left, top, right, bottom = _font(config.word_size).getbbox(text)
    grid = config.word_grid
    xs = [x for x in range(0, x1, grid) if x + left >= x0 and x + right <= x1]
    ys = [y for y in range(0, y1, grid) if y + top >= y0 and y + bottom <= y1]
    if not xs or not ys:
        raise ValueError(
            f"word {text!r} at {config.word_size} px has no anchor on the {grid} px grid inside the row "
            f"{row_box}: lower word_size or raise min_side"
        )
    return SceneWord(text=text, row=row, x=rng.choice(xs), y=rng.choice(ys), font_size=config.word_size)


def _sample_word(rng: random.Random, width: int, height: int, row: int, config: WorldConfig) -> SceneWord:
    text = rng.choice(WORDS)
    x0, y0, _, _ = _cell_bounds(width, height, row, 0)
    _, _, x1, y1 = _cell_bounds(width, height, row, 2)
    if config.word_grid:
        return _typeset_word(rng, text, row, (x0, y0, x1, y1), config)
    size = max(10, int((y1 - y0) * rng.uniform(0.65, 1.0)))
    left, top, right, bottom = _font(size).getbbox(text)
    while right - left > x1 - x0 or bottom - top > y1 - y0:  # shrink until the ink fits the row
        if size == 6:
            raise ValueError(f"word {text!r} does not fit a {width}x{height} image even at 6 px")
        size -= 1
        left, top, right, bottom = _font(size).getbbox(text)
    # Anchor so the ink box (not the font's line box) lies inside the row.
    x = rng.randint(x0 - left, x1 - right)
    y = rng.randint(y0 - top, y1 - bottom)
    return SceneWord(text=text, row=row, x=x, y=y, font_size=size)


def sample_scene(rng: random.Random, config: WorldConfig) -> Scene:
    """Draw a random scene: size, background, 1..max_objects uniquely labelled shapes in distinct cells, maybe a word.

    Args:
        rng: the only source of randomness; equal states give equal scenes.
        config: sampler knobs.

    Returns:
        The scene (geometry only; `render_scene` draws it).
    """
    width = rng.randint(config.min_side, config.max_side)
    height = rng.randint(config.min_side, config.max_side)
    background = rng.choice(BACKGROUNDS)
    cells = [(row, col) for row in range(3) for col in range(3)]
    word = None
    if rng.random() < config.word_prob:
        word = _sample_word(rng, width, height, rng.randrange(3), config)
        cells = [cell for cell in cells if cell[0] != word.row]
    num_objects = rng.randint(1, min(config.max_objects, len(cells)))
    labels: set[tuple[str, str]] = set()
    while len(labels) < num_objects:  # unique labels, so "the red circle" always names one object
        labels.add((rng.choice(tuple(COLOURS)), rng.choice(SHAPES)))
    objects = []
    for (colour, shape), (row, col) in zip(sorted(labels), rng.sample(cells, num_objects), strict=True):
        x0, y0, x1, y1 = _cell_bounds(width, height, row, col)
        span = min(x1 - x0, y1 - y0)
        size = rng.randint(max(MIN_SHAPE, int(0.55 * span)), int(0.95 * span))
        objects.append(
            SceneObject(colour, shape, row, col, rng.randint(x0, x1 - size), rng.randint(y0, y1 - size), size)
        )
    rng.shuffle(objects)  # the label sort above must not leak into drawing or caption order
    return Scene(width, height, background, tuple(objects), word)


def _shape_polygon(obj: SceneObject) -> list[tuple[float, float]]:
    """Vertices in PIL's inclusive pixel coordinates of the square [x, x + size - 1]."""
    left, top, far = obj.x, obj.y, obj.size - 1
    right, bottom = left + far, top + far
    cx, cy = left + far / 2, top + far / 2
    if obj.shape == "square":
        return [(left, top), (right, top), (right, bottom), (left, bottom)]
    if obj.shape == "triangle":
        return [(cx, top), (right, bottom), (left, bottom)]
    if obj.shape == "diamond":
        return [(cx, top), (right, cy), (cx, bottom), (left, cy)]
    if obj.shape == "star":
        # Five points; the inner radius 0.45 keeps the arms thick enough to survive downsampling.
        points = []
        for k in range(10):  # alternate outer and inner vertices, starting at the top
            radius = far / 2 if k % 2 == 0 else 0.45 * far / 2
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(f"no polygon for shape {obj.shape!r}; known shapes: {SHAPES}")


def _paint(image: Image.Image, mask: Image.Image, colour: tuple[int, int, int]) -> Box:
    """Fill `colour` through `mask` and return the mask's tight box (half-open xyxy)."""
    box = mask.getbbox()
    if box is None:
        raise ValueError(f"nothing was drawn for colour {colour} on a {image.size} image")
    image.paste(colour, (0, 0, *image.size), mask)
    return box


def render_scene(scene: Scene) -> RenderedScene:
    """Draw a scene: shapes aliased (pure colours), the word antialiased in INK.

    Args:
        scene: output of `sample_scene`.

    Returns:
        The RGB image (width x height) and the tight box of every drawn object and of the word.
    """
    image = Image.new("RGB", (scene.width, scene.height), scene.background)
    object_boxes = []
    for obj in scene.objects:
        mask = Image.new("L", image.size, 0)
        draw = ImageDraw.Draw(mask)
        if obj.shape == "circle":
            draw.ellipse((obj.x, obj.y, obj.x + obj.size - 1, obj.y + obj.size - 1), fill=255)
        else:
            draw.polygon(_shape_polygon(obj), fill=255)
        object_boxes.append(_paint(image, mask, COLOURS[obj.colour]))
    word_box = None
    if scene.word is not None:
        mask = Image.new("L", image.size, 0)
        word = scene.word
        ImageDraw.Draw(mask).text((word.x, word.y), word.text, fill=255, font=_font(word.font_size))
        word_box = _paint(image, mask, INK)
    return RenderedScene(image, tuple(object_boxes), word_box)
