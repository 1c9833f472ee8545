"""The box text format (mllm/boxes.py): values by hand, round trips, IoU, parsing, and which image a box refers to."""

import random

import pytest

from rice_mllm.mllm.assembly import TINY_TOKENIZER, build_processor
from rice_mllm.mllm.boxes import (
    RegionError,
    box_iou,
    box_text,
    box_to_pixels,
    check_box,
    fill_regions,
    parse_boxes,
    replace_boxes,
)


def test_box_text_of_a_640x480_image_by_hand():
    size = (480, 640)  # (height, width), as the kit passes sizes
    assert box_text([64, 48, 320, 240], size) == "<|box_start|>(100,100),(500,500)<|box_end|>"
    # 1/640 -> 1.5625 -> 2; 1/480 -> 2.08 -> 2; 639/640 -> 998.4 -> 998; 479/480 -> 997.9 -> 998
    assert box_text([1, 1, 639, 479], size) == "<|box_start|>(2,2),(998,998)<|box_end|>"
    assert box_text([0, 0, 640, 480], size) == "<|box_start|>(0,0),(1000,1000)<|box_end|>"
    assert box_text([-10, -1, 700, 481.5], size) == "<|box_start|>(0,0),(1000,1000)<|box_end|>"  # clamped
    assert box_text([32, 120, 64, 240], size) == "<|box_start|>(50,250),(100,500)<|box_end|>"  # x by width
    assert box_to_pixels((100, 100, 500, 500), size) == (64, 48, 320, 240)


@pytest.mark.parametrize("size", [(480, 640), (20, 3000), (1999, 37), (1000, 1000), (7, 5)])
def test_pixel_text_pixel_round_trip_is_within_one_normalised_unit(size):
    height, width = size
    rng = random.Random(0)
    for _ in range(300):
        x0, x1 = sorted(rng.sample(range(width + 1), 2))
        y0, y1 = sorted(rng.sample(range(height + 1), 2))
        (normalised,) = parse_boxes(box_text([x0, y0, x1, y1], size))
        back = box_to_pixels(normalised, size)
        for got, want, extent in zip(back, (x0, y0, x1, y1), (width, height, width, height), strict=True):
            assert abs(got - want) <= extent / 1000, (size, (x0, y0, x1, y1), back)


@pytest.mark.parametrize(
    "a, b, iou",
    [
        ((0, 0, 10, 10), (5, 5, 15, 15), 25 / 175),
        ((0, 0, 10, 10), (0, 0, 10, 10), 1.0),
        ((0, 0, 10, 10), (0, 0, 5, 10), 0.5),
        ((0, 0, 10, 10), (10, 0, 20, 10), 0.0),  # touching edges
        ((0, 0, 10, 10), (20, 20, 30, 30), 0.0),
        ((0, 0, 100, 100), (0, 0, 100, 49), 0.49),
        ((5, 5, 5, 5), (5, 5, 5, 5), 0.0),  # empty union
        ((10, 10, 0, 0), (0, 0, 10, 10), 0.0),  # an inverted box has no area
    ],
)
def test_iou_by_hand(a, b, iou):
    assert box_iou(a, b) == pytest.approx(iou)
    assert box_iou(b, a) == pytest.approx(iou)


@pytest.mark.parametrize(
    "text, boxes",
    [
        ("<|box_start|>(1,2),(3,4)<|box_end|>", [(1, 2, 3, 4)]),
        ("at <|box_start|> ( 1 , 2 ) , ( 3,4 ) <|box_end|>.", [(1, 2, 3, 4)]),
        (
            "<|box_start|>(0,0),(1000,1000)<|box_end|> and <|box_start|>(5,6),(7,8)<|box_end|>",
            [(0, 0, 1000, 1000), (5, 6, 7, 8)],
        ),
        ("<|box_start|>(1,2),\n(3,4)<|box_end|>", [(1, 2, 3, 4)]),
        ("(1,2),(3,4)", []),  # no tokens
        ("<|box_start|>(1,2),(3,4)", []),  # unfinished
        ("<|box_start|>(1,2),(3,4)<|box_end>", []),  # a misspelt token
        ("<box_start>(1,2),(3,4)<box_end>", []),
        ("<|box_start|>(1,2,3,4)<|box_end|>", []),
        ("<|box_start|>(1.5,2),(3,4)<|box_end|>", []),
        ("<|box_start|>(-1,2),(3,4)<|box_end|>", []),
        ("<|box_start|>(1,2),(3,1001)<|box_end|>", []),  # beyond the normalised range
        ("<|box_start|>(1,2),(3,10000)<|box_end|>", []),
    ],
)
def test_parse_boxes_tolerates_spaces_and_is_strict_about_tokens(text, boxes):
    assert parse_boxes(text) == boxes


def test_replace_boxes_leaves_other_text():
    text = "a <|box_start|>(1,2),(3,4)<|box_end|> b <|box_start|>(1,2),(3,1001)<|box_end|>"
    assert replace_boxes(text, lambda box: f"[{sum(box)}]") == "a [10] b <|box_start|>(1,2),(3,1001)<|box_end|>"


def test_a_box_refers_to_the_nearest_image_before_it_across_turns():
    sizes = [(100, 200), (400, 100), (50, 50)]  # (height, width)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image>\n<image>\nWhat is at <region>?"},
        {"role": "assistant", "content": "<region>"},
        {"role": "user", "content": "<image>\nAnd <region>, then <region>"},
    ]
    regions = [[20, 40, 50, 200], [0, 0, 100, 400], [0, 0, 50, 50], [10, 10, 20, 50]]
    filled = fill_regions(messages, regions, sizes)
    assert [m["role"] for m in filled] == [m["role"] for m in messages]
    assert filled[1]["content"] == "<image>\n<image>\nWhat is at <|box_start|>(200,100),(500,500)<|box_end|>?"
    assert filled[2]["content"] == "<|box_start|>(0,0),(1000,1000)<|box_end|>"
    third = "<|box_start|>(200,200),(400,1000)<|box_end|>"
    assert filled[3]["content"] == f"<image>\nAnd <|box_start|>(0,0),(1000,1000)<|box_end|>, then {third}"
    assert messages[2]["content"] == "<region>"  # the input is not changed


@pytest.mark.parametrize(
    "contents, regions, message",
    [
        (["<image>\n<region> <region>"], [[0, 0, 5, 5]], r"wrong count: 2 <region> placeholder\(s\) but 1 region\(s\)"),
        (["<image>\nno placeholder"], [[0, 0, 5, 5]], r"wrong count: 0 <region> placeholder\(s\) but 1 region\(s\)"),
        (["<region> <image>"], [[0, 0, 5, 5]], r"region 0: its <region> comes before any <image>"),
        (["<image>", "<region> <region>"], [[0, 0, 5, 5], [6, 0, 6, 5]], r"region 1 \(on image 0\): box .* is empty"),
        (["<image>", "<region> <region>"], [[0, 0, 5, 5], [0, 9, 5, 8]], r"region 1 \(on image 0\): box .* is empty"),
        (["<image><region>"], [[-1, 0, 5, 5]], r"region 0 \(on image 0\): box .* outside the 30x20"),
        (["<image><region>"], [[0, 0, 31, 5]], r"region 0 \(on image 0\): box .* outside the 30x20"),
        (["<image><region>"], [[0, 0, 30, 21]], r"region 0 \(on image 0\): box .* outside the 30x20"),
        (["<image><region>"], [[0, 0, 5]], r"region 0 \(on image 0\): a box is 4 numbers"),
        (["<image><image><region>"], [[0, 0, 5, 5]], r"region 0: on image 1, but the sample has 1 image\(s\)"),
    ],
)
def test_regions_that_do_not_fit_are_refused_by_index(contents, regions, message):
    messages = [{"role": "user", "content": content} for content in contents]
    with pytest.raises(RegionError, match=message):
        fill_regions(messages, regions, [(20, 30)])


def test_check_box_accepts_the_whole_image_and_refuses_non_numbers():
    check_box([0, 0, 30, 20], (20, 30))
    for bad in ([0, 0, 1, float("nan")], [0, 0, True, 1], ["0", 0, 1, 1], (0, 0, 1, 1, 1)):
        with pytest.raises(ValueError, match="a box is 4 numbers"):
            check_box(bad, (20, 30))


def test_processor_fills_regions_only_when_given():
    processor = build_processor(TINY_TOKENIZER, tile_size=28)
    messages = [{"role": "user", "content": "<image>\nWhat is at <region>?"}, {"role": "assistant", "content": "red"}]
    by_hand = [
        dict(messages[0], content="<image>\nWhat is at <|box_start|>(250,0),(500,1000)<|box_end|>?"),
        messages[1],
    ]
    sizes = [(40, 80)]
    filled = processor.encode(messages, sizes, regions=[[20, 0, 40, 40]])
    expected = processor.encode(by_hand, sizes)
    assert all(filled[key].tolist() == expected[key].tolist() for key in expected)
    as_text = processor.encode(messages, sizes)  # regions=None: the placeholder is text
    assert "<region>" in processor.tokenizer.decode(as_text["input_ids"])
    with pytest.raises(RegionError, match="wrong count"):
        processor.encode(messages, sizes, regions=[])
