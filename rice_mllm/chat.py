"""`python -m rice_mllm.chat`: a streaming multi-turn terminal chat with any kit checkpoint.

Bad input (a missing or corrupt image, an unknown command, an oversized image, a box outside the image) costs one
line of explanation, never the session. Boxes go in as `/box` pixels of the last image shown and come out in pixels
of the same image (mllm/boxes.py holds the text format between them). Invariant: the streamed text equals the reply
`inference.answer` returns for the same conversation, its boxes shown in pixels (`pixel_boxes`).
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import threading
from pathlib import Path

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList

from .checkpoint_layout import CheckpointFormatError
from .constants import IMAGE_TOKEN
from .inference import (
    ImageReadError,
    ReplyStreamer,
    answer,
    load_for_inference,
    quiet_transformers,
    read_image,
    template_marker_in,
)
from .loading import CheckpointMismatchError
from .mllm.boxes import BOX_END, BOX_START, REGION_TOKEN, box_text, box_to_pixels, check_box, replace_boxes
from .mllm.processing import SampleTooLongError

DEFAULT_MODEL = Path("outputs/tiny-world/stage2_instruct")  # where `python -m rice_mllm.tiny_world` leaves it
HOW_TO_TRAIN = "make one with: python -m rice_mllm.tiny_world (or pass --model DIR)"
PROMPT, REPLY = "you: ", "assistant: "
MAX_BOX_TEXT = 64  # longest text held back as a box being streamed (a box text is at most 47 characters unspaced)
HELP = """commands:
  /image PATH [PATH ...]  attach images to your next message (quote paths with spaces)
  /box X0 Y0 X1 Y1        point at a region (pixels of the last image) in your next message: it replaces a <region>
                          you type there, else it follows your text
  /reset                  forget the conversation and pending images
  /help                   this text
  /exit                   leave (Ctrl-D works too; Ctrl-C stops a reply)"""


class ChatInputError(ValueError):
    """A user input the chat refuses with a one-line message."""


def read_user_image(path: str) -> Image.Image:
    """Decode an image fully as RGB, or raise ChatInputError saying why not."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ChatInputError(f"no such image: {file}")
    try:
        return read_image(file, str(file))
    except ImageReadError as error:
        raise ChatInputError(str(error)) from None


def parse_box_argument(argument: str) -> list[float]:
    """The 4 numbers of `/box X0 Y0 X1 Y1` (commas allowed), or ChatInputError with the usage."""
    try:
        box = [float(value) for value in argument.replace(",", " ").split()]
    except ValueError:
        box = []
    if len(box) != 4:
        raise ChatInputError("usage: /box X0 Y0 X1 Y1 (pixels of the last image)")
    return [int(value) if value.is_integer() else value for value in box]  # shown in refusals as typed


def pixel_boxes(text: str, image_size: tuple[int, int] | None, printed: str = "") -> str:
    """`text` with each box shown as `[box (x0, y0)-(x1, y1) px]` on an image of (height, width); as is without one.

    A box written right after a word (Qwen2-VL's "blue circle<|box_start|>...") is set off by a space; `printed` is
    what was printed before `text`, for a box at its start."""
    if image_size is None:
        return text
    tail = printed[-1:]
    text = re.sub(rf"(?<=\S){re.escape(BOX_START)}", " " + BOX_START, tail + text)[len(tail) :]
    return replace_boxes(text, lambda box: "[box ({}, {})-({}, {}) px]".format(*box_to_pixels(box, image_size)))


def _unfinished_box_start(text: str) -> int:
    """Where a box text that more pieces may complete starts in `text`; len(text) when none can."""
    start = text.rfind(BOX_START)
    if start >= 0 and BOX_END not in text[start:] and len(text) - start <= MAX_BOX_TEXT:
        return start
    for size in range(min(len(BOX_START) - 1, len(text)), 0, -1):  # a token's text may end mid-marker
        if BOX_START.startswith(text[-size:]):
            return len(text) - size
    return len(text)


class PixelBoxPrinter:
    """Streamed reply pieces -> printable pieces, boxes in pixels (`pixel_boxes`). Text that may be the start of a
    box is held back until the box is complete or cannot be one, so a box split across pieces prints whole."""

    def __init__(self, image_size: tuple[int, int] | None) -> None:
        self.image_size, self.held, self.printed = image_size, "", ""

    def feed(self, piece: str) -> str:
        text = self.held + piece
        cut = _unfinished_box_start(text)
        self.held = text[cut:]
        return self._show(text[:cut])

    def finish(self) -> str:
        text, self.held = self.held, ""
        return self._show(text)

    def _show(self, text: str) -> str:
        shown = pixel_boxes(text, self.image_size, self.printed)
        self.printed = (self.printed + shown)[-1:]
        return shown


def _check_box_on(box: list[float], image_size: tuple[int, int]) -> None:
    """boxes.check_box, its refusal a ChatInputError."""
    try:
        check_box(box, image_size)
    except ValueError as error:
        raise ChatInputError(str(error)) from None


class StopOnEvent(StoppingCriteria):
    """Stops generation once `event` is set (Ctrl-C in the terminal thread)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ChatSession:
    """Conversation state: the messages so far, every image they reference, images and pixel boxes waiting for the
    next turn."""

    def __init__(self, model, processor, generation: dict) -> None:
        self.model, self.processor, self.generation = model, processor, generation
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, str]] = []
        self.images: list[Image.Image] = []
        self.pending: list[Image.Image] = []
        self.boxes: list[list[float]] = []

    def attach(self, image: Image.Image) -> None:
        self.pending.append(image)

    def shown_image_size(self) -> tuple[int, int] | None:
        """(height, width) of the last image shown (attached or pending): the one boxes are measured on."""
        shown = [*self.images, *self.pending]
        return (shown[-1].height, shown[-1].width) if shown else None

    def add_box(self, box: list[float]) -> None:
        """Point at a region of the last image shown in the next turn; ChatInputError when it has no such region."""
        size = self.shown_image_size()
        if size is None:
            raise ChatInputError("no image to point at: attach one with /image PATH first")
        _check_box_on(box, size)
        self.boxes.append(box)

    def _with_boxes(self, text: str) -> str:
        """`text` with the pending boxes' texts in its `<region>` placeholders, or after it when it has none.

        A box refers to the nearest image before it (boxes.py): in this turn that is the last image shown, so each
        box is checked again on it (an image attached after `/box` may be smaller)."""
        placed = text.count(REGION_TOKEN)
        if placed not in (0, len(self.boxes)):
            raise ChatInputError(f"the message has {placed} {REGION_TOKEN} but {len(self.boxes)} /box region(s) wait")
        size = self.shown_image_size()
        for box in self.boxes:
            _check_box_on(box, size)
        texts = [box_text(box, size) for box in self.boxes]
        if not placed:
            return " ".join([text, *texts])
        pieces = text.split(REGION_TOKEN)
        return pieces[0] + "".join(inserted + piece for inserted, piece in zip(texts, pieces[1:], strict=True))

    def next_turn(self, text: str) -> tuple[list[dict[str, str]], list[Image.Image]]:
        """Messages and images of the conversation extended by a user turn: pending images first, one `<image>`
        line each, as the training data has them. Raises ChatInputError for text the template cannot carry."""
        if marker := template_marker_in(text):
            raise ChatInputError(f"messages cannot contain {marker!r}; attach images with /image PATH")
        content = f"{IMAGE_TOKEN}\n" * len(self.pending) + self._with_boxes(text)
        return [*self.messages, {"role": "user", "content": content}], [*self.images, *self.pending]

    def ask(self, text: str, **generate_kwargs) -> str:
        """Send one user turn and return the reply; on failure the state is unchanged."""
        messages, images = self.next_turn(text)
        try:
            reply = answer(self.model, self.processor, messages, images, **self.generation, **generate_kwargs)
        except SampleTooLongError as error:
            raise ChatInputError(f"{error}; /reset or send fewer images") from None
        self.messages = [*messages, {"role": "assistant", "content": reply}]
        self.images, self.pending, self.boxes = images, [], []
        return reply


def stream_reply(session: ChatSession, text: str) -> None:
    """Print the reply piece by piece as it is generated; Ctrl-C stops it (the partial reply is kept)."""
    _, images = session.next_turn(text)  # refuse bad text before the reply header is printed
    printer = PixelBoxPrinter((images[-1].height, images[-1].width) if images else None)
    print(REPLY, end="", flush=True)
    streamer = ReplyStreamer(session.processor.tokenizer)
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            session.ask(text, streamer=streamer, stopping_criteria=StoppingCriteriaList([StopOnEvent(stop)]))
        except BaseException as error:  # re-raised in the terminal thread below
            errors.append(error)
            streamer.pieces.put(None)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    try:
        for piece in streamer:
            print(printer.feed(piece), end="", flush=True)
    except KeyboardInterrupt:
        stop.set()
        print(printer.finish() + " [stopped]", end="")
    worker.join()
    print(printer.finish())
    if errors:
        raise errors[0]


def handle_line(session: ChatSession, line: str) -> bool:
    """Act on one input line; False means leave. Raises ChatInputError for input the chat refuses."""
    line = line.strip()
    if not line:
        return True
    if not line.startswith("/"):
        stream_reply(session, line)
        return True
    command, _, argument = line.partition(" ")
    if command == "/exit":
        return False
    if command == "/help":
        print(HELP)
    elif command == "/reset":
        session.reset()
        print("(conversation cleared)")
    elif command == "/image":
        try:
            paths = shlex.split(argument)
        except ValueError as error:
            raise ChatInputError(f"cannot parse the paths: {error}") from None
        if not paths:
            raise ChatInputError("usage: /image PATH [PATH ...]")
        images = [read_user_image(path) for path in paths]  # all or none: a bad path attaches nothing
        for image in images:
            session.attach(image)
        print(f"(images attached to your next message: {len(session.pending)})")
    elif command == "/box":
        session.add_box(parse_box_argument(argument))
        print(f"(regions for your next message: {len(session.boxes)})")
    else:
        raise ChatInputError(f"unknown command {command}; /help lists the commands")
    return True


def repl(session: ChatSession, header: str) -> None:
    """Read lines until /exit or end of input; refused input prints one `! reason` line and the chat goes on."""
    try:
        import readline  # noqa: F401  (line editing and history for input(), where the platform has it)
    except ImportError:
        pass
    print(header)
    if session.pending:
        print(f"({len(session.pending)} image(s) attached to your first message)")
    print("Type a message, /help for commands, /exit to leave.")
    while True:
        try:
            line = input(PROMPT)
        except EOFError:
            print()
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt discards the line, like a shell
            print()
            continue
        try:
            if not handle_line(session, line):
                return
        except ChatInputError as error:
            print(f"! {error}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rice_mllm.chat", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help=f"kit checkpoint directory (default: {DEFAULT_MODEL})")
    parser.add_argument("--image", action="append", default=[], help="image for the first message (repeatable)")
    parser.add_argument("--prompt", help="answer this one message, print only the answer, and exit")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--load-4bit", action="store_true", help="4-bit NF4 LLM (bitsandbytes); encoder kept as is")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    return parser.parse_args(argv)


LOAD_ERRORS = (ChatInputError, CheckpointFormatError, CheckpointMismatchError, OSError, RuntimeError, ValueError)


def model_dir_of(model: Path | None) -> Path:
    """`--model` as given, else the tiny world's model (DEFAULT_MODEL); ChatInputError when that is absent too."""
    if model is None and not DEFAULT_MODEL.is_dir():
        raise ChatInputError(f"no --model given and no tiny-world model at {DEFAULT_MODEL}; {HOW_TO_TRAIN}")
    return model or DEFAULT_MODEL


def main(argv: list[str] | None = None) -> int:
    """Run the chat (or answer `--prompt` once). Returns the exit status: 0, or 2 with a message on stderr."""
    args = parse_args(argv)
    try:
        model_dir = model_dir_of(args.model)
        images = [read_user_image(path) for path in args.image]  # before the slow model load: a typo fails fast
        model, processor = load_for_inference(model_dir, args.device, args.dtype, args.load_4bit)
    except LOAD_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    generation = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p}
    session = ChatSession(model, processor, generation)
    for image in images:
        session.attach(image)
    if args.prompt is None:
        quantised = ", 4-bit LLM" if args.load_4bit else ""
        repl(session, f"rice_mllm chat: {model_dir} on {model.device} ({model.vision_tower.dtype}{quantised})")
        return 0
    try:
        reply = session.ask(args.prompt)
    except ChatInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(pixel_boxes(reply, session.shown_image_size()))
    return 0


if __name__ == "__main__":
    quiet_transformers()
    raise SystemExit(main())
