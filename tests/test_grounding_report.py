"""scripts/grounding_report.py: misses sorted by where the box lands, box centres compared within their cell, and the
attention an answer takes from the question's words."""

import runpy
from pathlib import Path

import pytest
import torch

REPORT = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "grounding_report.py"))
SIZE = (96, 96)  # (height, width): cells of 32 px
OBJECTS = [{"box": [4, 4, 24, 24]}, {"box": [40, 40, 60, 60]}]


def _answer(truth, box, correct=False):
    return {"size": SIZE, "objects": OBJECTS, "truth": tuple(truth), "box": box and tuple(box), "correct": correct}


def test_misses_are_sorted_by_where_the_box_lands():
    answers = [
        _answer([4, 4, 24, 24], [5, 5, 24, 24], correct=True),
        _answer([4, 4, 24, 24], None),
        _answer([4, 4, 24, 24], [42, 42, 58, 58]),  # centre (50, 50): inside the other object
        _answer([4, 4, 24, 24], [70, 70, 90, 90]),  # centre (80, 80): inside no object
        _answer([4, 4, 24, 24], [0, 0, 30, 12]),  # centre (15, 6): the right object, IoU 160 / 600
        _answer([40, 40, 60, 60], [10, 10, 18, 18]),  # centre (14, 14): inside the other object
    ]
    kinds = REPORT["miss_kinds"](answers)
    assert kinds == {"no box": 1, "another object": 2, "on nothing": 1, "right object, IoU < 0.5": 1}


def test_centres_are_compared_within_their_cell():
    # true centres 10, 14, 18 px into three different cells, both ways; predicted ones (each box holds its true
    # centre) at 9, 16, 17 px across, correlation by hand 32 / sqrt(32 * 38), and 18, 14, 10 down, correlation -1
    truths = [(0, 0, 20, 20), (36, 36, 56, 56), (72, 8, 92, 28)]  # centres (10, 10), (46, 46), (82, 18)
    boxes = [(0, 9, 18, 27), (39, 37, 57, 55), (72, 1, 90, 19)]  # centres (9, 18), (48, 46), (81, 10)
    answers = [_answer(t, b) for t, b in zip(truths, boxes, strict=True)]
    across, down, count = REPORT["centre_correlation"](answers)
    assert count == 3
    assert across == pytest.approx(32 / (32 * 38) ** 0.5) and down == pytest.approx(-1.0)


def test_pooling_weights_are_the_boxs_share_of_each_patch():
    # box x 4..20, y 12..28 over the 16 px patches of a 2x2 cell: columns take 12 and 4 px, rows 4 and 12 px,
    # so the areas are [[48, 16], [144, 48]] of 256
    weights = REPORT["box_patch_weights"]([4, 12, 20, 28], range(2), range(2), 16.0)
    assert weights.tolist() == [[48 / 256, 16 / 256], [144 / 256, 48 / 256]]
    # the second column of patches of a cell starting at patch 2 holds all of a box inside it
    assert REPORT["box_patch_weights"]([50, 34, 60, 44], range(2, 4), range(2, 4), 16.0).tolist() == [[0, 1], [0, 0]]


def test_answers_are_split_by_whether_another_object_shares_the_asked_shape():
    objects = [
        {"box": [4, 4, 24, 24], "label": "red circle"},
        {"box": [40, 4, 60, 24], "label": "blue circle"},  # the red circle's shape twin
        {"box": [4, 40, 24, 60], "label": "red star"},  # same colour as the red circle: not a shape twin
    ]
    asked = [([4, 4, 24, 24], True), ([40, 4, 60, 24], False), ([40, 4, 60, 24], False), ([4, 40, 24, 60], True)]
    answers = [
        {"size": SIZE, "objects": objects, "truth": tuple(truth), "box": None, "correct": correct}
        for truth, correct in asked
    ]
    assert REPORT["shape_twin_accuracy"](answers) == {"with a shape twin": (1, 3), "without": (1, 1)}


def test_word_attention_is_the_last_querys_weight_on_the_words_tokens_per_layer_and_head():
    first, second = torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3)
    first[0, :, 0] = torch.tensor([1.0, 0.0, 0.0])  # an earlier query, which does not write the answer
    first[0, 0, -1], first[0, 1, -1] = torch.tensor([0.2, 0.5, 0.3]), torch.tensor([0.6, 0.1, 0.3])
    second[0, 0, -1], second[0, 1, -1] = torch.tensor([0.0, 0.0, 1.0]), torch.tensor([0.9, 0.05, 0.05])
    shares = REPORT["word_attention"]((first, second), [1, 2])
    torch.testing.assert_close(shares, torch.tensor([[0.8, 0.4], [1.0, 0.1]]))


def test_a_word_is_found_in_every_spelling_after_the_start():
    # 7 8 is " blue", 9 is "blue": the question's and the answer's; the system prompt (before 3) is not searched
    assert REPORT["word_positions"]([7, 8, 1, 3, 7, 8, 2, 9, 4], [[7, 8], [9]], 3) == [4, 5, 7]
    assert REPORT["word_positions"]([7, 8], [[7, 8]], 0) == [0, 1]
    with pytest.raises(ValueError, match="after position 1"):
        REPORT["word_positions"]([3, 1, 2], [[3]], 1)
