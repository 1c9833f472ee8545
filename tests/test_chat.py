"""The chat CLI in a real terminal (pty), its --prompt mode, its refusals, and 4-bit loading on CPU."""

import os
import pty
import select
import struct
import subprocess
import sys
import time
import zlib
from types import SimpleNamespace

import bitsandbytes as bnb
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from rice_mllm.chat import PixelBoxPrinter, ReplyStreamer, main, pixel_boxes, stream_reply
from rice_mllm.inference import decode_reply, load_for_inference, prepare_inputs
from rice_mllm.mllm.assembly import TINY_TOKENIZER
from rice_mllm.mllm.modeling import RiceMllmForConditionalGeneration
from rice_mllm.mllm.processing import RiceMllmProcessor
from tests.fixtures import REPO_ROOT, noise_image, reference_reply, save_tiny_kit
from tests.test_data import QWEN_DIR

MAX_NEW_TOKENS = 6


def _png_header_only(path, width: int, height: int) -> None:
    """A PNG whose header claims width x height (no pixel data): PIL reports its size without decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """Checkpoint dir, its model and processor loaded independently, and a folder of good and bad images."""
    root = tmp_path_factory.mktemp("chat")
    checkpoint = save_tiny_kit(root / "kit")
    images = root / "images"
    images.mkdir()
    for name, (height, width), seed in [("a.png", (40, 60), 1), ("b.png", (70, 30), 2), ("c.png", (20, 20), 3)]:
        noise_image(height, width, seed).save(images / name)
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    _png_header_only(images / "huge.png", 8000, 8100)  # 64.8 M pixels: over the chat's limit, under PIL's own
    model = RiceMllmForConditionalGeneration.from_pretrained(checkpoint).eval()
    return checkpoint, images, model, RiceMllmProcessor.from_pretrained(checkpoint)


class Terminal:
    """A process on the slave side of a pseudo-terminal; lines are typed and output read on the master side."""

    def __init__(self, argv: list[str], cwd) -> None:
        self.master, slave = pty.openpty()
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TERM="dumb", HF_HUB_OFFLINE="1")
        self.process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env)
        os.close(slave)
        self.pending = b""

    def read_until(self, marker: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while marker.encode() not in self.pending:
            ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"no {marker!r} within {timeout}s; output so far: {self.pending!r}")
            self.pending += os.read(self.master, 4096)
        end = self.pending.index(marker.encode()) + len(marker)
        text, self.pending = self.pending[:end].decode(), self.pending[end:]
        return text

    def exchange(self, line: str) -> str:
        """Type a line; return what the program printed before its next prompt (echo and prompt removed)."""
        os.write(self.master, line.encode() + b"\n")
        text = self.read_until("you: ")
        echo = line + "\r\n"
        assert text.startswith(echo), text
        return text[len(echo) : -len("you: ")]

    def close(self) -> int:
        try:
            return self.process.wait(timeout=30)
        finally:
            os.close(self.master)


def _one_line(output: str, start: str) -> str:
    assert output.startswith(start) and output.endswith("\r\n") and output.count("\r\n") == 1, output
    return output


def _reply(output: str) -> str:
    assert output.startswith("assistant: ") and output.endswith("\r\n"), output
    # The terminal turns "\n" into "\r\n" (ONLCR); undo it to compare with the model's text.
    return output[len("assistant: ") : -len("\r\n")].replace("\r\n", "\n")


def test_interactive_session_streams_generate_replies_and_survives_bad_input(kit):
    checkpoint, images, model, processor = kit
    a, b, c = (noise_image(*size, seed) for size, seed in [((40, 60), 1), ((70, 30), 2), ((20, 20), 3)])
    first = [{"role": "user", "content": "<image>\n<image>\nWhat is here?"}]
    reply_1 = reference_reply(model, processor, first, [a, b], MAX_NEW_TOKENS)
    second = [*first, {"role": "assistant", "content": reply_1}, {"role": "user", "content": "<image>\nAnd now?"}]
    reply_2 = reference_reply(model, processor, second, [a, b, c], MAX_NEW_TOKENS)
    fresh = [{"role": "user", "content": "And now?"}]
    reply_3 = reference_reply(model, processor, fresh, [], MAX_NEW_TOKENS)
    # Preconditions: the replies differ, so images, history and /reset each visibly change the answer.
    without_images = reference_reply(model, processor, [{"role": "user", "content": "What is here?"}], [], 6)
    assert len({reply_1, reply_2, reply_3, without_images}) == 4 and all([reply_1, reply_2, reply_3])

    argv = [sys.executable, "-m", "rice_mllm.chat", "--model", str(checkpoint), "--max-new-tokens", "6"]
    terminal = Terminal(argv, cwd=images)
    try:
        assert terminal.read_until("you: ").endswith(
            "on cpu (torch.float32)\r\nType a message, /help for commands, /exit to leave.\r\nyou: "
        )
        assert "no such image" in _one_line(terminal.exchange("/image missing.png"), "! ")
        assert "cannot read" in _one_line(terminal.exchange("/image corrupt.png"), "! ")
        assert "8000x8100" in _one_line(terminal.exchange("/image huge.png"), "! ")
        assert "unknown command /imagine" in _one_line(terminal.exchange("/imagine a.png"), "! ")
        assert "<image>" in _one_line(terminal.exchange("what is <image>?"), "! ")
        _one_line(terminal.exchange("/image a.png b.png"), "(images attached")
        assert _reply(terminal.exchange("What is here?")) == reply_1
        _one_line(terminal.exchange("/image c.png"), "(images attached")
        assert _reply(terminal.exchange("And now?")) == reply_2
        _one_line(terminal.exchange("/reset"), "(conversation cleared)")
        assert _reply(terminal.exchange("And now?")) == reply_3
        os.write(terminal.master, b"/exit\n")
    finally:
        status = terminal.close()
    assert status == 0


def test_box_command_points_at_a_region_of_the_last_image(kit):
    """a.png is 60 x 40 pixels (width x height): /box 6 4 30 20 is (100,100),(500,500) in normalised coordinates."""
    checkpoint, images, model, processor = kit
    a = noise_image(40, 60, 1)
    first = [{"role": "user", "content": "<image>\nWhat is at <|box_start|>(100,100),(500,500)<|box_end|>?"}]
    reply_1 = reference_reply(model, processor, first, [a], MAX_NEW_TOKENS)
    second = [*first, {"role": "assistant", "content": reply_1}]
    second.append({"role": "user", "content": "And here? <|box_start|>(0,0),(1000,1000)<|box_end|>"})
    reply_2 = reference_reply(model, processor, second, [a], MAX_NEW_TOKENS)
    # Preconditions: the box text changes the reply, so a box left out or misplaced would show.
    other = [{"role": "user", "content": "<image>\nWhat is at <|box_start|>(0,0),(1000,1000)<|box_end|>?"}]
    assert reply_1 != reference_reply(model, processor, other, [a], MAX_NEW_TOKENS)

    argv = [sys.executable, "-m", "rice_mllm.chat", "--model", str(checkpoint), "--max-new-tokens", "6"]
    terminal = Terminal(argv, cwd=images)
    try:
        terminal.read_until("you: ")
        assert "no image to point at" in _one_line(terminal.exchange("/box 1 2 3 4"), "! ")
        _one_line(terminal.exchange("/image a.png"), "(images attached")
        assert "usage: /box X0 Y0 X1 Y1" in _one_line(terminal.exchange("/box 1 2 3"), "! ")
        assert "box [30, 10, 10, 20] is empty" in _one_line(terminal.exchange("/box 30 10 10 20"), "! ")
        assert "box [10, 5, 70, 30] is outside the 60x40" in _one_line(terminal.exchange("/box 10 5 70 30"), "! ")
        refused = _one_line(terminal.exchange("What is at <region>?"), "! ")
        assert "the message has 1 <region> but 0 /box region(s)" in refused
        assert _one_line(terminal.exchange("/box 6 4 30 20"), "(regions for your next message: 1)")
        assert _reply(terminal.exchange("What is at <region>?")) == reply_1
        assert _one_line(terminal.exchange("/box 0,0,60,40"), "(regions for your next message: 1)")  # cleared
        assert _reply(terminal.exchange("And here?")) == reply_2
        os.write(terminal.master, b"/exit\n")
    finally:
        status = terminal.close()
    assert status == 0


REPLY_WITH_BOXES = (
    "It is <|box_start|>(100,100),(500,500)<|box_end|>, not <|box_start|>( 0, 0),(1000,1000)<|box_end|> but blue"
    " circle<|box_start|>(0,500),(500,1000)<|box_end|> <|box_st"
)
PRINTED = (  # on a 640 x 480 image; a box right after a word is set off by a space
    "It is [box (64, 48)-(320, 240) px], not [box (0, 0)-(640, 480) px] but blue circle [box (0, 240)-(320, 480) px]"
    " <|box_st"
)


def test_boxes_split_anywhere_across_streamed_pieces_print_whole_in_pixels():
    assert pixel_boxes(REPLY_WITH_BOXES, (480, 640)) == PRINTED
    assert pixel_boxes(REPLY_WITH_BOXES, None) == REPLY_WITH_BOXES  # no image: nothing to measure in
    text = REPLY_WITH_BOXES
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            printer = PixelBoxPrinter((480, 640))
            printed = [printer.feed(piece) for piece in (text[:i], text[i:j], text[j:])]
            assert "".join(printed) + printer.finish() == PRINTED, (i, j)
            assert not any("<|" in piece for piece in printed), (i, j)  # nothing of a box shows before it is whole
    unfinished = "<|box_start|>(1,2" + " and no end" * 10
    assert PixelBoxPrinter((480, 640)).feed(unfinished) == unfinished  # a long unclosed box is not held forever


class _ScriptedSession:
    """What stream_reply uses of a ChatSession: one image in the turn, and a reply generated token by token."""

    def __init__(self, tokenizer, reply: str, image: Image.Image) -> None:
        self.processor = SimpleNamespace(tokenizer=tokenizer)
        self.tokens = tokenizer(reply, add_special_tokens=False)["input_ids"]
        self.image = image

    def next_turn(self, text):
        return [{"role": "user", "content": text}], [self.image]

    def ask(self, text, streamer, stopping_criteria):
        streamer.put(torch.zeros(1, 0, dtype=torch.long))  # the prompt, which generate pushes first
        for token in self.tokens:
            streamer.put(torch.tensor([token]))
        streamer.end()


@pytest.mark.parametrize("tokenizer_dir", [QWEN_DIR, TINY_TOKENIZER])
def test_streamed_reply_prints_its_boxes_in_pixels_of_the_last_image(tokenizer_dir, capsys):
    """Qwen2.5's tokenizer has one special token per box marker; the tiny one spells them out in many tokens."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    reply = "The cat is at <|box_start|>(100,100),(500,500)<|box_end|>."
    session = _ScriptedSession(tokenizer, reply, Image.new("RGB", (640, 480)))
    stream_reply(session, "Where is the cat?")
    assert capsys.readouterr().out == "assistant: The cat is at [box (64, 48)-(320, 240) px].\n"


def test_replies_keep_qwen_box_tokens_and_drop_other_special_tokens():
    tokenizer = AutoTokenizer.from_pretrained(QWEN_DIR)
    box = "<|box_start|>(1,2),(3,4)<|box_end|>"
    tokens = tokenizer(f"<|object_ref_start|>a cat<|object_ref_end|> at {box}<|im_end|>")["input_ids"]
    assert tokenizer.convert_tokens_to_ids("<|box_start|>") in tokens
    assert decode_reply(tokenizer, tokens) == f"a cat at {box}"
    plain = tokenizer("  héllo 世界 <|im_end|>")["input_ids"]
    assert decode_reply(tokenizer, plain) == tokenizer.decode(plain, skip_special_tokens=True).strip() == "héllo 世界"


def test_prompt_mode_prints_only_the_answer(kit, capsys):
    checkpoint, images, model, processor = kit
    image = noise_image(40, 60, 1)
    expected = reference_reply(model, processor, [{"role": "user", "content": "<image>\nWhat?"}], [image], 6)
    capsys.readouterr()
    argv = ["--model", str(checkpoint), "--image", str(images / "a.png"), "--prompt", "What?", "--max-new-tokens", "6"]
    assert main(argv) == 0
    assert capsys.readouterr().out == expected + "\n"


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing model", "no such checkpoint folder"),
        ("not a checkpoint", "not a model folder"),
        ("missing image", "no such image"),
        ("corrupt image", "cannot read"),
        (
            "no model, no default",
            "no tiny-world model at outputs/tiny-world/stage2_instruct; make one with: python -m rice_mllm.tiny_world",
        ),
    ],
)
def test_prompt_mode_bad_paths_exit_nonzero_with_a_message(kit, tmp_path, monkeypatch, capsys, case, message):
    checkpoint, images, _, _ = kit
    monkeypatch.chdir(tmp_path)  # no outputs/ folder here
    argv = {
        "missing model": ["--model", str(tmp_path / "nowhere")],
        "not a checkpoint": ["--model", str(images)],
        "missing image": ["--model", str(checkpoint), "--image", str(images / "missing.png")],
        "corrupt image": ["--model", str(checkpoint), "--image", str(images / "corrupt.png")],
        "no model, no default": [],
    }[case]
    capsys.readouterr()
    assert main([*argv, "--prompt", "hi"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert message in captured.err and captured.err.startswith("error: ")


def test_streamed_pieces_join_to_the_stripped_reply(kit):
    """Byte-level pieces of multi-byte characters are held back until complete; outer whitespace never shows."""
    _, _, _, processor = kit
    text = "  héllo 世界 ok\n\n "
    tokens = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(tokens) > len(text.split()) + 2  # the CJK characters are split into byte tokens
    streamer = ReplyStreamer(processor.tokenizer)
    streamer.put(torch.zeros(1, 0, dtype=torch.long))  # the prompt, which generate pushes first
    for token in tokens:
        streamer.put(torch.tensor([token]))
    streamer.end()
    pieces = list(streamer)
    assert "".join(pieces) == "héllo 世界 ok"
    assert all("\ufffd" not in piece for piece in pieces)


def test_load_4bit_quantises_only_the_llm_decoder_and_answers(tmp_path, capsys):
    checkpoint = save_tiny_kit(tmp_path / "kit64", text_hidden=64)  # bnb's CPU kernel packs 64-input blocks
    quantised, processor = load_for_inference(checkpoint, "cpu", load_4bit=True)
    full, _ = load_for_inference(checkpoint, "cpu")
    decoder = quantised.language_model.model.layers
    linears = [m for m in decoder.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, bnb.nn.Linear4bit) for m in linears)
    for part in (quantised.vision_tower, quantised.projector, quantised.language_model.lm_head):
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in part.modules())
        assert all(p.dtype == torch.float32 for p in part.parameters())

    # NF4 of the float weights: a ~10% approximation (bitsandbytes repacks them on the first CPU forward: read now).
    dequantised = {
        name: bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
        for name, m in quantised.named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
    }
    float_weights = dict(full.named_parameters())
    for name, weight in dequantised.items():
        reference = float_weights[f"{name}.weight"]
        assert 0 < (weight - reference).norm() / reference.norm() < 0.15, name

    messages = [{"role": "user", "content": "<image>\nWhat is here?"}]
    image = noise_image(40, 60, 1)
    inputs = prepare_inputs(processor, [(messages, [image])], torch.device("cpu"), torch.float32)
    with torch.no_grad():
        logits_4bit, logits_full = quantised(**inputs).logits[0], full(**inputs).logits[0]
        for name, weight in dequantised.items():
            float_weights[f"{name}.weight"].copy_(weight)
        logits_dequantised = full(**inputs).logits[0]
    cosine = torch.nn.functional.cosine_similarity
    # Loosely the float model (random N(0, 0.3) weights amplify the 4-bit error), tightly the float model that
    # holds the dequantised weights (the 4-bit kernel's bf16 scales are the only difference; the random weights
    # amplify that rounding at some positions: 0.9976 at the worst of this prompt's, 0.9998 on average).
    assert cosine(logits_4bit, logits_full, dim=-1).mean() > 0.8
    similarity = cosine(logits_4bit, logits_dequantised, dim=-1)
    assert similarity.mean() > 0.999 and similarity.min() > 0.995

    # The CLI path answers with the quantised model.
    expected = reference_reply(quantised, processor, messages, [image], MAX_NEW_TOKENS)
    image.save(tmp_path / "a.png")
    capsys.readouterr()
    argv = ["--model", str(checkpoint), "--load-4bit", "--device", "cpu", "--image", str(tmp_path / "a.png")]
    assert main([*argv, "--prompt", "What is here?", "--max-new-tokens", str(MAX_NEW_TOKENS)]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_load_4bit_refuses_shapes_the_cpu_kernel_cannot_run(kit, capsys):
    checkpoint, _, _, _ = kit  # hidden size 32: half a 64-input block
    assert main(["--model", str(checkpoint), "--load-4bit", "--device", "cpu", "--prompt", "hi"]) == 2
    assert "q_proj (32x32)" in capsys.readouterr().err
