"""`python -m rice_mllm.chat`: a streaming multi-turn terminal chat with any kit checkpoint.

Bad input (a missing or corrupt image, an unknown command, an oversized image) costs one line of explanation, never
the session. Invariant: the streamed text equals the reply `inference.answer` returns for the same conversation.
"""

from __future__ import annotations

import argparse
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
from .mllm.processing import SampleTooLongError

DEFAULT_MODEL = Path("outputs/tiny-world/stage2_instruct")  # where `python -m rice_mllm.tiny_world` leaves it
HOW_TO_TRAIN = "make one with: python -m rice_mllm.tiny_world (or pass --model DIR)"
PROMPT, REPLY = "you: ", "assistant: "
HELP = """commands:
  /image PATH [PATH ...]  attach images to your next message (quote paths with spaces)
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


class StopOnEvent(StoppingCriteria):
    """Stops generation once `event` is set (Ctrl-C in the terminal thread)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ChatSession:
    """Conversation state: the messages so far, every image they reference, images waiting for the next turn."""

    def __init__(self, model, processor, generation: dict) -> None:
        self.model, self.processor, self.generation = model, processor, generation
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, str]] = []
        self.images: list[Image.Image] = []
        self.pending: list[Image.Image] = []

    def attach(self, image: Image.Image) -> None:
        self.pending.append(image)

    def next_turn(self, text: str) -> tuple[list[dict[str, str]], list[Image.Image]]:
        """Messages and images of the conversation extended by a user turn: pending images first, one `<image>`
        line each, as the training data has them. Raises ChatInputError for text the template cannot carry."""
        if marker := template_marker_in(text):
            raise ChatInputError(f"messages cannot contain {marker!r}; attach images with /image PATH")
        content = f"{IMAGE_TOKEN}\n" * len(self.pending) + text
        return [*self.messages, {"role": "user", "content": content}], [*self.images, *self.pending]

    def ask(self, text: str, **generate_kwargs) -> str:
        """Send one user turn and return the reply; on failure the state is unchanged."""
        messages, images = self.next_turn(text)
        try:
            reply = answer(self.model, self.processor, messages, images, **self.generation, **generate_kwargs)
        except SampleTooLongError as error:
            raise ChatInputError(f"{error}; /reset or send fewer images") from None
        self.messages = [*messages, {"role": "assistant", "content": reply}]
        self.images, self.pending = images, []
        return reply


def stream_reply(session: ChatSession, text: str) -> None:
    """Print the reply piece by piece as it is generated; Ctrl-C stops it (the partial reply is kept)."""
    session.next_turn(text)  # refuse bad text before the reply header is printed
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
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        stop.set()
        print(" [stopped]", end="")
    worker.join()
    print()
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
        print(session.ask(args.prompt))
    except ChatInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    quiet_transformers()
    raise SystemExit(main())
