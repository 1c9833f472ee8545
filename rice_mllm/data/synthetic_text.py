"""Language of the embedded tiny world: captions and question-answer turns phrased from a `Scene`.

Invariant: every answer is a single exact string read off the scene (a colour, a shape, a digit string, a position
name, a word, "first" / "second"), so exact-match evaluation is meaningful; questions name only unique referents.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from rice_mllm.constants import IMAGE_TOKEN
from rice_mllm.data.synthetic_scene import COLOURS, SHAPE_PLURALS, SHAPES, Scene, SceneObject

# Record-level `question_type` values. "text" records carry no image, "multi_image" records carry two.
QUESTION_TYPES: tuple[str, ...] = ("colour", "shape", "count", "position", "reading", "text", "multi_image")
IMAGE_QUESTION_TYPES: tuple[str, ...] = QUESTION_TYPES[:5]
CAPTION_PROMPTS: tuple[str, ...] = ("Describe the image briefly.", "What is in the image?", "Give a short caption.")
MULTI_TURN_PROB = 0.3
MAX_TURNS = 3

Turn = tuple[str, str]  # (question, answer)

_SHAPE_FACTS: tuple[Turn, ...] = (
    ("How many sides does a triangle have?", "3"),
    ("How many sides does a square have?", "4"),
    ("How many sides does a diamond have?", "4"),
    ("How many points does a star have?", "5"),
)
_SUM_TERMS = 10  # text-only sums add two numbers below this
_ORDINALS = ("first", "second")
_PREPOSITIONS = {"left": "on the", "right": "on the", "center": "in the"}
COLOUR_TEMPLATES = ("What colour is the {}?", "Which colour is the {}?")


def with_article(name: str) -> str:
    """ "a red star", "an orange star"."""
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _where(obj: SceneObject) -> str:
    return f"{_PREPOSITIONS.get(obj.position, 'at the')} {obj.position}"


def caption(scene: Scene, shape_first: bool = False) -> str:
    """One-sentence caption naming every object with its position, then the word if any.

    e.g. "A red circle at the top left, an orange square in the center and the word 'cat'." or, shape first,
    "A circle at the top left coloured red, a square in the center coloured orange and the word 'cat'."
    Why both: writing a caption, the model names each object's next attribute by finding the object it has just
    named. Colour-first captions only ever find an object by its colour, which is what shape questions need;
    shape-first ones find it by its shape, which colour and position questions need.
    Objects come in the scene's (random) drawing order, not top-to-bottom: in reading order the first object is
    the top-most one, so the order would give places away instead of making the model find them.
    """
    if shape_first:
        named = [(obj.shape, f"{_where(obj)} coloured {obj.colour}") for obj in scene.objects]
    else:
        named = [(obj.label, _where(obj)) for obj in scene.objects]
    parts = [f"{with_article(name)} {rest}" for name, rest in named]
    if scene.word is not None:
        parts.append(f"the word '{scene.word.text}'")
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def _colour_turns(scene: Scene, rng: random.Random) -> list[Turn]:
    shapes = [obj.shape for obj in scene.objects]
    return [
        (rng.choice(COLOUR_TEMPLATES).format(obj.shape), obj.colour)
        for obj in scene.objects
        if shapes.count(obj.shape) == 1
    ]


def _shape_turns(scene: Scene, rng: random.Random) -> list[Turn]:
    colours = [obj.colour for obj in scene.objects]
    templates = ("What shape is the {} object?", "Which shape is {}?")
    return [
        (rng.choice(templates).format(obj.colour), obj.shape) for obj in scene.objects if colours.count(obj.colour) == 1
    ]


def _count_turns(scene: Scene, rng: random.Random) -> list[Turn]:
    turns = [("How many shapes are there?", str(len(scene.objects)))]
    # Mostly ask about colours and shapes that are present; sometimes about any, so "0" is a possible answer but
    # not the answer a model can always guess.
    present = rng.random() < 0.7
    colour = rng.choice(sorted({obj.colour for obj in scene.objects}) if present else tuple(COLOURS))
    turns.append((f"How many {colour} shapes are there?", str(sum(obj.colour == colour for obj in scene.objects))))
    shape = rng.choice(sorted({obj.shape for obj in scene.objects}) if present else SHAPES)
    turns.append((f"How many {SHAPE_PLURALS[shape]} are there?", str(sum(obj.shape == shape for obj in scene.objects))))
    return turns


def _position_turns(scene: Scene, rng: random.Random) -> list[Turn]:
    """Name an object by its shape alone when no other object has that shape, else by colour and shape. Why: colour
    questions were otherwise the only turns that find an object by its shape word, and the tiny LLM learnt that
    lookup in only some runs (naming any colour in the image instead)."""
    shapes = [obj.shape for obj in scene.objects]
    return [
        (f"Where is the {obj.shape if shapes.count(obj.shape) == 1 else obj.label}?", obj.position)
        for obj in scene.objects
    ]


def _reading_turns(scene: Scene, rng: random.Random) -> list[Turn]:
    if scene.word is None:
        return []
    templates = ("What word is written in the image?", "What does the text say?", "Read the word in the image.")
    return [(rng.choice(templates), scene.word.text)]


_TURN_MAKERS: dict[str, Callable[[Scene, random.Random], list[Turn]]] = {
    "colour": _colour_turns,
    "shape": _shape_turns,
    "count": _count_turns,
    "position": _position_turns,
    "reading": _reading_turns,
}


def question_turns(scene: Scene, question_type: str, rng: random.Random, every_turn: bool = False) -> list[Turn]:
    """Question-answer turns of one type about a scene: one turn, or with probability 0.3 up to three.

    Args:
        scene: the scene asked about.
        question_type: one of IMAGE_QUESTION_TYPES.
        rng: source of the template, target and turn-count choices.
        every_turn: return every turn the scene supports, shuffled, instead of the first one to three. The same
            draws are made either way, so the stream after this call does not depend on it.

    Returns:
        Turns in asking order; empty when the scene cannot support the type (e.g. "reading" without a word,
        "colour" when every shape occurs twice).
    """
    if question_type not in _TURN_MAKERS:
        raise KeyError(f"unknown image question type {question_type!r}; valid: {sorted(_TURN_MAKERS)}")
    turns = _TURN_MAKERS[question_type](scene, rng)
    rng.shuffle(turns)
    num_turns = rng.randint(2, MAX_TURNS) if rng.random() < MULTI_TURN_PROB else 1
    return turns if every_turn else turns[:num_turns]


def supported_question_types(scene: Scene) -> list[str]:
    """The image question types this scene can answer, in IMAGE_QUESTION_TYPES order."""
    return [kind for kind, make in _TURN_MAKERS.items() if make(scene, random.Random(0))]


def text_only_turns(rng: random.Random, count: int) -> list[Turn]:
    """`count` different questions that need no image: small sums and facts about the world's shapes."""
    available = _SUM_TERMS**2 + len(_SHAPE_FACTS)  # every sum, and the facts
    if count > available:
        raise ValueError(f"asked for {count} different text-only questions; only {available} exist")
    turns: list[Turn] = []
    while len(turns) < count:
        if rng.random() < 0.5:
            a, b = rng.randrange(_SUM_TERMS), rng.randrange(_SUM_TERMS)
            turn = f"What is {a} plus {b}?", str(a + b)
        else:
            turn = rng.choice(_SHAPE_FACTS)
        if turn not in turns:
            turns.append(turn)
    return turns


def _in_image(question: str, ordinal: str) -> str:
    """A one-image question asked about the `ordinal` image of a pair: "Where is the star?" -> "Where is the star in
    the first image?", "Read the word in the image." -> "Read the word in the first image."."""
    if "the image" in question:
        return question.replace("the image", f"the {ordinal} image")
    return f"{question[:-1]} in the {ordinal} image{question[-1]}"


def _one_image_turns(scene: Scene, ordinal: str, rng: random.Random) -> list[Turn]:
    """Every question of one random type the scene supports, asked about it as the `ordinal` image of a pair."""
    kind = rng.choice(supported_question_types(scene))
    return [(_in_image(question, ordinal), answer) for question, answer in _TURN_MAKERS[kind](scene, rng)]


def two_image_turns(first: Scene, second: Scene, rng: random.Random, every_question: bool = False) -> list[Turn]:
    """Questions about a pair of scenes, shown in this order: which one holds a given object, or a one-image question
    about the first or the second ("What colour is the star in the second image?").

    With `every_question` (for training): every "Which image has ...?" (for each object only one image holds), then
    every question of one random type about each image, both images' interleaved, so that the ordinal, not the order,
    says which image is asked about. The one-image questions come last because their answers would give the "which"
    ones away ("What shape is the red object in the second image? star"), which a held-out question, asked alone,
    does not allow. Otherwise one question, as a held-out record asks it: "which" or one-image, half and half.
    No total count over both images: that is counting and then adding, which the tiny LLM does not learn in the
    main job's minutes. One type per image: asking every type gained little for a fifth more stage-2 time.
    """
    labels = [{obj.label for obj in scene.objects} for scene in (first, second)]
    which = [
        (f"Which image has the {label}? Answer first or second.", answer)
        for answer, own, other in zip(_ORDINALS, labels, labels[::-1], strict=True)
        for label in sorted(own - other)
    ]
    scenes = dict(zip(_ORDINALS, (first, second), strict=True))
    if not every_question:
        if which and rng.random() < 0.5:
            return [rng.choice(which)]
        ordinal = rng.choice(_ORDINALS)
        return [rng.choice(_one_image_turns(scenes[ordinal], ordinal, rng))]
    rng.shuffle(which)
    each = [turn for ordinal, scene in scenes.items() for turn in _one_image_turns(scene, ordinal, rng)]
    rng.shuffle(each)
    return which + each


def _image_line(number: int, num_images: int) -> str:
    """The line of the `number`-th image: a bare `<image>` when it is the only one, else labelled with its ordinal
    ("Second image: <image>"), so the image tokens follow the word the questions and answers call them by."""
    return f"{IMAGE_TOKEN}\n" if num_images == 1 else f"{_ORDINALS[number].capitalize()} image: {IMAGE_TOKEN}\n"


def conversation(turns: list[Turn], num_images: int) -> list[dict[str, str]]:
    """LLaVA `conversations` list; the first human turn starts with one `<image>` line per image (at most two)."""
    if not turns:
        raise ValueError("a conversation needs at least one turn")
    messages = []
    for index, (question, answer) in enumerate(turns):
        prefix = "".join(_image_line(number, num_images) for number in range(num_images)) if index == 0 else ""
        messages.append({"from": "human", "value": prefix + question})
        messages.append({"from": "gpt", "value": answer})
    return messages
