"""Region, grounding and absent-object questions of the embedded tiny world (issue #30; absent objects as POPE asks).

Invariant: a `<region>` placeholder's box is the tight pixel box `render_scene` reports for the object or word it
names, so a region answer and a grounding box are right by construction; absent questions name only colour+shape
combinations (or shapes) that the scene does not hold.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from rice_mllm.data.synthetic_scene import COLOURS, SHAPES, Box, RenderedScene, Scene
from rice_mllm.data.synthetic_text import COLOUR_TEMPLATES, MAX_TURNS, MULTI_TURN_PROB, Turn, with_article
from rice_mllm.mllm.boxes import REGION_TOKEN

REGION_QUESTION_TYPES: tuple[str, ...] = ("region", "grounding", "absent")
# (question, answer, pixel boxes of the turn's `<region>` placeholders, question's first then answer's)
RegionTurn = tuple[str, str, tuple[Box, ...]]
GROUNDING_SUFFIX = " Answer with its box."  # what turns "Where is the blue circle?" into a grounding question


def _region_turns(scene: Scene, rendered: RenderedScene, rng: random.Random) -> list[RegionTurn]:
    """Per object, its colour or its shape at its box; the word at its box."""
    templates = (("What colour is the shape at {}?", "colour"), ("What shape is at {}?", "shape"))
    turns = []
    for obj, box in zip(scene.objects, rendered.object_boxes, strict=True):
        template, attribute = rng.choice(templates)
        turns.append((template.format(REGION_TOKEN), getattr(obj, attribute), (box,)))
    if scene.word is not None:
        turns.append((f"What is written at {REGION_TOKEN}?", scene.word.text, (rendered.word_box,)))
    return turns


def grounding_turns(scene: Scene, rendered: RenderedScene) -> list[RegionTurn]:
    """Each object's box, named by colour and shape (unique in every scene: `sample_scene` draws unique labels).

    The answer names the object before its box ("blue circle<|box_start|>..."), as Qwen2-VL answers grounding (less
    its `<|object_ref_*|>` markers, which the tiny tokenizer lacks). Why: writing a bare box, the first coordinate's
    token read the question's shape word and not its colour word (scripts/grounding_report.py), so two objects of one
    shape got one box; named in the answer, the colour word is a few tokens back."""
    labels = [obj.label for obj in scene.objects]
    return [
        (f"Where is the {obj.label}?{GROUNDING_SUFFIX}", f"{obj.label}{REGION_TOKEN}", (box,))
        for obj, box in zip(scene.objects, rendered.object_boxes, strict=True)
        if labels.count(obj.label) == 1
    ]


def _absent_turns(scene: Scene, rendered: RenderedScene, rng: random.Random) -> list[RegionTurn]:
    """ "Is there a ...?" once answered "yes" and once "no" (a colour+shape the scene lacks), so a type's yes/no turns
    are balanced; and, when a shape is missing, its colour question answered "There is no <shape>."."""
    present = {obj.label for obj in scene.objects}
    absent = sorted({f"{colour} {shape}" for colour in COLOURS for shape in SHAPES} - present)
    turns: list[RegionTurn] = [
        (f"Is there {with_article(rng.choice(sorted(present)))}?", "yes", ()),
        (f"Is there {with_article(rng.choice(absent))}?", "no", ()),
    ]
    missing = [shape for shape in SHAPES if shape not in {obj.shape for obj in scene.objects}]
    if missing:
        shape = rng.choice(missing)
        turns.append((rng.choice(COLOUR_TEMPLATES).format(shape), f"There is no {shape}.", ()))
    return turns


_TURN_MAKERS: dict[str, Callable[[Scene, RenderedScene, random.Random], list[RegionTurn]]] = {
    "region": _region_turns,
    "grounding": lambda scene, rendered, rng: grounding_turns(scene, rendered),
    "absent": _absent_turns,
}


def region_question_turns(
    scene: Scene, rendered: RenderedScene, question_type: str, rng: random.Random
) -> list[RegionTurn]:
    """Turns of one of REGION_QUESTION_TYPES about a scene: one, or with probability 0.3 up to three (as
    `question_turns` picks them). `rendered` gives the boxes; empty when the scene cannot support the type."""
    if question_type not in _TURN_MAKERS:
        raise KeyError(f"unknown region question type {question_type!r}; valid: {sorted(_TURN_MAKERS)}")
    turns = _TURN_MAKERS[question_type](scene, rendered, rng)
    rng.shuffle(turns)
    num_turns = rng.randint(2, MAX_TURNS) if rng.random() < MULTI_TURN_PROB else 1
    return turns[:num_turns]


def split_turns(turns: list[RegionTurn]) -> tuple[list[Turn], list[list[int]]]:
    """Region turns -> plain (question, answer) turns and the record's "regions" (pixel boxes in placeholder order)."""
    return [(question, answer) for question, answer, _ in turns], [list(box) for *_, boxes in turns for box in boxes]
