"""The eval command: answer normalisation, per-type scoring, batched predictions equal to one-by-one generate,
and --blank-images that leaves no trace of the images in the answers."""

import json
from collections import Counter

import pytest
from PIL import Image

from rice_mllm.data.sources import Conversation, load_conversations
from rice_mllm.data.synthetic import generate
from rice_mllm.eval import EvalRecordError, eval_item, exact_match, main, normalize_answer, predict, score
from rice_mllm.inference import load_for_inference
from rice_mllm.mllm.assembly import TINY_TOKENIZER, build_processor
from rice_mllm.mllm.boxes import fill_regions
from rice_mllm.mllm.modeling import RiceMllmForConditionalGeneration
from rice_mllm.mllm.processing import RiceMllmProcessor
from tests.fixtures import reference_reply, save_tiny_kit

MAX_NEW_TOKENS = 4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny-world QA file (22 records over 9 question types: text-only, two-image and region ones) and a model."""
    root = tmp_path_factory.mktemp("eval")
    generate(root / "world", seed=0, num_images=1, num_heldout=3)
    return root / "world" / "qa_heldout.json", save_tiny_kit(root / "kit")


@pytest.mark.parametrize(
    "prediction, reference, equal",
    [
        ("Red.", "red", True),
        ("  the   Blue\tcircle!\n", "the blue circle", True),
        ('"top-left"', "top-left", True),
        ("top left", "top-left", False),  # inner punctuation is part of the answer
        ("3.", "3", True),
        ("red square", "red", False),
        ("reds", "red", False),
        ("", "...", True),
    ],
)
def test_exact_match_normalises_case_outer_punctuation_and_spaces(prediction, reference, equal):
    assert exact_match(prediction, reference) is equal


def test_normalize_answer_by_hand():
    assert normalize_answer("  ¿Qué?  OK,  Fine. ") == "¿qué? ok, fine"  # "¿" is not ASCII punctuation: kept


def _record(index, question_type, answer):
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}]
    metadata = {"id": f"r{index}"} | ({} if question_type is None else {"question_type": question_type})
    return eval_item(Conversation(messages, [], "hand.json", index, metadata))


def test_score_counts_and_accuracy_per_type():
    items = [_record(0, "colour", "red"), _record(1, "colour", "blue"), _record(2, "count", "3"), _record(3, None, "x")]
    report = score(items, ["Red", "green", "3.", "y"])
    assert report["per_type"] == {
        "all": {"count": 1, "correct": 0, "accuracy": 0.0},
        "colour": {"count": 2, "correct": 1, "accuracy": 0.5},
        "count": {"count": 1, "correct": 1, "accuracy": 1.0},
    }
    assert report["overall"] == {"count": 4, "correct": 2, "accuracy": 0.5}
    assert [row["correct"] for row in report["predictions"]] == [True, False, True, False]


def test_records_without_a_final_answer_are_refused_by_name():
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "?"},
    ]
    with pytest.raises(EvalRecordError, match=r"hand.json record 7: the last turn must be an assistant answer"):
        eval_item(Conversation(messages, [], "hand.json", 7, {}))


def test_records_the_processor_refuses_are_named(world):
    data_file, checkpoint = world
    model, processor = load_for_inference(checkpoint, "cpu")
    good, bad = load_conversations(data_file)[:2]
    assert len(bad.images) == 1
    bad.messages[0]["content"] = "<image>\n" + bad.messages[0]["content"]  # two placeholders, one image
    with pytest.raises(EvalRecordError, match=r"qa_heldout.json record 1: 2 <image> placeholder\(s\)"):
        predict(model, processor, [eval_item(good), eval_item(bad)], batch_size=2, progress=False)


def _reference_predictions(data_file, checkpoint):
    """One-by-one greedy replies, prompts = each record's turns before its last (`<region>`s filled with the boxes'
    texts), images opened with PIL here."""
    model = RiceMllmForConditionalGeneration.from_pretrained(checkpoint).eval()
    processor = RiceMllmProcessor.from_pretrained(checkpoint)
    roles = {"human": "user", "gpt": "assistant"}
    replies = []
    for record in json.loads(data_file.read_text()):
        messages = [{"role": roles[turn["from"]], "content": turn["value"]} for turn in record["conversations"]]
        paths = record.get("image", [])
        paths = [paths] if isinstance(paths, str) else paths
        images = [Image.open(data_file.parent / path).convert("RGB") for path in paths]
        sizes = [(image.height, image.width) for image in images]
        messages = fill_regions(messages, record.get("regions", []), sizes)[:-1]
        replies.append(reference_reply(model, processor, messages, images, MAX_NEW_TOKENS))
    return replies


def test_eval_command_reports_every_record_by_type(world, tmp_path, capsys):
    data_file, checkpoint = world
    records = json.loads(data_file.read_text())
    expected = _reference_predictions(data_file, checkpoint)
    # Even records get the model's own answer (case and punctuation changed) as reference: those, and only those
    # unless a random answer happens to equal the real one, must score as correct.
    # Grounding answers ("<region>", a box) keep theirs: their box is the reference.
    edited_ones = [
        index % 2 == 0 and "<region>" not in r["conversations"][-1]["value"] for index, r in enumerate(records)
    ]
    for record, prediction, edit in zip(records, expected, edited_ones, strict=True):
        if edit:
            record["conversations"][-1]["value"] = prediction.upper() + "."
    edited = data_file.parent / "qa_edited.json"
    edited.write_text(json.dumps(records))
    report_file = tmp_path / "out" / "report.json"
    argv = ["--model", str(checkpoint), "--data", str(edited), "--batch-size", "4", "--device", "cpu"]
    report = main([*argv, "--max-new-tokens", str(MAX_NEW_TOKENS), "--report", str(report_file), "--no-progress"])

    per_type = Counter(record["question_type"] for record in records)
    assert {kind: stats["count"] for kind, stats in report["per_type"].items()} == per_type
    assert len(per_type) >= 5 and report["overall"]["count"] == len(records)
    assert [row["prediction"] for row in report["predictions"]] == expected  # left-padded batches = one by one
    originals = [record["conversations"][-1]["value"] for record in json.loads(data_file.read_text())]
    pairs = zip(edited_ones, expected, originals, strict=True)
    correct = [edit or prediction.lower() == original.lower() for edit, prediction, original in pairs]
    assert [row["correct"] for row in report["predictions"]] == correct
    assert report["overall"]["correct"] == sum(correct)
    assert json.loads(report_file.read_text()) == report
    table = capsys.readouterr().out.splitlines()
    overall = report["overall"]
    assert table[-1].split() == ["overall", str(len(records)), str(sum(correct)), f"{overall['accuracy']:.3f}"]
    for kind, count in per_type.items():
        assert any(line.split()[:2] == [kind, str(count)] for line in table)


def test_limit_takes_the_first_records(world):
    data_file, checkpoint = world
    argv = ["--model", str(checkpoint), "--data", str(data_file), "--limit", "3", "--no-progress"]
    report = main([*argv, "--max-new-tokens", "1"])
    assert [row["index"] for row in report["predictions"]] == [0, 1, 2]


def test_blank_images_remove_what_the_images_show_and_their_size(world, tmp_path):
    data_file, checkpoint = world
    model, processor = load_for_inference(checkpoint, "cpu")
    # One record per image, without boxes (another image's size would move a box's text).
    first = {}
    for conversation in load_conversations(data_file):
        if len(conversation.images) == 1 and not conversation.regions:
            first.setdefault(conversation.images[0], conversation)
    items = [eval_item(c) for c in first.values()][:4]
    # The same questions over other images (of other sizes): each record gets the next record's image.
    shifted = [
        eval_item(Conversation(item.conversation.messages, nxt.conversation.images, "shifted", item.index, {}))
        for item, nxt in zip(items, items[1:] + items[:1], strict=True)
    ]
    assert len({Image.open(item.conversation.images[0]).size for item in items}) > 1

    def answers(selected, blank):
        return predict(model, processor, selected, 8, blank, progress=False, max_new_tokens=MAX_NEW_TOKENS)

    assert answers(items, blank=False) != answers(shifted, blank=False)  # the images do change the answers
    assert answers(items, blank=True) == answers(shifted, blank=True)


def _box(x0, y0, x1, y1):
    return f"<|box_start|>({x0},{y0}),({x1},{y1})<|box_end|>"


def test_box_references_are_scored_by_iou_around_the_bar():
    """Reference (0,0)-(100,100): a prediction (0,0)-(100,h) has IoU h/100."""
    reference = _box(0, 0, 100, 100)
    cases = [  # (reference, prediction, metric, iou, correct)
        (reference, _box(0, 0, 100, 49), "iou", 0.49, False),
        (reference, _box(0, 0, 100, 51), "iou", 0.51, True),
        (reference, _box(0, 0, 100, 50), "iou", 0.5, True),  # the bar itself counts
        (
            "It is at " + reference + ".",
            f"first {_box(500, 500, 600, 600)}, then {_box(0, 0, 100, 100)}",
            "iou",
            1.0,
            True,
        ),
        (reference, "(0,0),(100,100)", "iou", 0.0, False),  # no box in the prediction
        (
            reference + _box(500, 500, 600, 600),
            _box(500, 500, 600, 600),
            "iou",
            0.0,
            False,
        ),  # the reference's FIRST box
        ("red", "Red.", "exact", None, True),
        ("red", _box(0, 0, 100, 100), "exact", None, False),
    ]
    items = [
        _record(i, "grounding" if metric == "iou" else "colour", ref) for i, (ref, _, metric, _, _) in enumerate(cases)
    ]
    report = score(items, [prediction for _, prediction, _, _, _ in cases])
    for row, (_, _, metric, iou, correct) in zip(report["predictions"], cases, strict=True):
        assert row["metric"] == metric and row["correct"] is correct
        assert row["iou"] == (None if iou is None else pytest.approx(iou))
    assert report["per_type"]["grounding"] == {"count": 6, "correct": 3, "accuracy": 0.5}
    assert report["per_type"]["colour"] == {"count": 2, "correct": 1, "accuracy": 0.5}


def _region_file(tmp_path):
    Image.new("RGB", (80, 40)).save(tmp_path / "a.png")  # width 80, height 40
    turns = [{"from": "human", "value": "<image>\nWhere is <region>?"}, {"from": "gpt", "value": "<region>"}]
    records = [
        {"image": "a.png", "regions": [[20, 0, 40, 40], [0, 0, 80, 40]], "conversations": turns},
        {"image": "a.png", "regions": [[20, 0, 40, 40], [0, 0, 81, 40]], "conversations": turns},
    ]
    (tmp_path / "regions.json").write_text(json.dumps(records))
    return load_conversations(tmp_path / "regions.json")


def test_region_placeholders_become_box_texts_of_the_records_own_images(tmp_path, monkeypatch):
    good, bad = _region_file(tmp_path)
    item = eval_item(good)
    assert item.messages[0]["content"] == "<image>\nWhere is " + _box(250, 0, 500, 1000) + "?"
    assert item.reference == _box(0, 0, 1000, 1000)
    with pytest.raises(EvalRecordError, match=r"regions.json record 1: region 1 \(on image 0\): box .* is outside"):
        eval_item(bad)
    # --blank-images hands the model a tile-sized blank image; the box text stays that of the 80 x 40 original.
    prompts = []
    monkeypatch.setattr(
        "rice_mllm.eval.answer_batch", lambda model, processor, batch, **kw: prompts.extend(batch) or [""]
    )
    predict(None, build_processor(TINY_TOKENIZER, tile_size=28), [item], blank_images=True, progress=False)
    ((messages, images),) = prompts
    assert messages == item.messages and [image.size for image in images] == [(28, 28)]
