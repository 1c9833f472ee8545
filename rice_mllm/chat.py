"""`python -m rice_mllm.chat`: a streaming multi-turn terminal chat with any kit checkpoint.

Bad input (a missing or corrupt image, an unknown command, an oversized image) costs one line of explanation, never
the session. `--prompt` answers once and prints only the answer, for scripts.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from PIL import Image
from transformers import TextIteratorStreamer

from .constants import IMAGE_TOKEN
from .inference import answer, load_for_inference
from .mllm.processing import SampleTooLongError

DEFAULT_MODEL = Path("runs/tiny-world/stage2_instruct")
MAX_IMAGE_PIXELS = 64_000_000  # beyond this a decompression bomb is likelier than a photo
HELP = """commands:
  /image PATH   attach an image to your next message (repeat for several)
  /reset        forget the conversation and pending images
  /help         this text
  /exit         leave (Ctrl-D works too)"""


class ChatInputError(ValueError):
    """A user input the chat refuses with a one-line message."""


def open_image(path: str) -> Image.Image:
    """Decode an image fully as RGB, or raise ChatInputError saying why not."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ChatInputError(f"no such image: {file}")
    try:
        with Image.open(file) as handle:
            if handle.width * handle.height > MAX_IMAGE_PIXELS:
                raise ChatInputError(f"{file} is {handle.width}x{handle.height}: over {MAX_IMAGE_PIXELS:,} pixels")
            return handle.convert("RGB")
    except (OSError, Image.DecompressionBombError) as error:
        raise ChatInputError(f"cannot read {file} as an image: {error}") from None


class ChatSession:
    """Conversation state: the messages so far, every image they reference, images waiting for the next turn."""

    def __init__(self, model, processor, generation: dict):
        self.model, self.processor, self.generation = model, processor, generation
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, str]] = []
        self.images: list[Image.Image] = []
        self.pending: list[Image.Image] = []

    def attach(self, path: str) -> None:
        self.pending.append(open_image(path))

    def ask(self, text: str, streamer=None) -> str:
        """Send one user turn (with the pending images) and return the reply; on failure the state is unchanged."""
        content = IMAGE_TOKEN * len(self.pending) + ("\n" if self.pending else "") + text
        messages = [*self.messages, {"role": "user", "content": content}]
        images = [*self.images, *self.pending]
        try:
            reply = answer(self.model, self.processor, messages, images, streamer=streamer, **self.generation)
        except SampleTooLongError as error:
            raise ChatInputError(f"{error}; /reset or send fewer images") from None
        self.messages = [*messages, {"role": "assistant", "content": reply}]
        self.images, self.pending = images, []
        return reply


def stream_reply(session: ChatSession, text: str) -> None:
    """Print the reply token by token as it is generated."""
    streamer = TextIteratorStreamer(session.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            session.ask(text, streamer=streamer)
        except BaseException as error:  # surfaced in the main thread below
            errors.append(error)
            streamer.end()

    worker = threading.Thread(target=run)
    worker.start()
    for piece in streamer:
        print(piece, end="", flush=True)
    worker.join()
    print()
    if errors:
        raise errors[0]


def handle_line(session: ChatSession, line: str) -> bool:
    """Act on one input line; False means leave."""
    line = line.strip()
    if not line:
        return True
    if line.startswith("/"):
        command, _, argument = line.partition(" ")
        if command == "/exit":
            return False
        if command == "/help":
            print(HELP)
        elif command == "/reset":
            session.reset()
            print("(conversation cleared)")
        elif command == "/image" and argument.strip():
            session.attach(argument.strip())
            print(f"(image attached: {len(session.pending)} pending for your next message)")
        elif command == "/image":
            raise ChatInputError("usage: /image PATH")
        else:
            raise ChatInputError(f"unknown command {command}; /help lists them")
        return True
    print("assistant: ", end="", flush=True)
    stream_reply(session, line)
    return True


def repl(session: ChatSession) -> None:
    print("rice_mllm chat: type a message, /help for commands, /exit to leave.")
    while True:
        try:
            line = input("you: ")
        except EOFError:
            print()
            return
        try:
            if not handle_line(session, line):
                return
        except ChatInputError as error:
            print(f"! {error}")


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_dir = args.model or DEFAULT_MODEL
    if not (model_dir / "config.json").is_file():
        hint = "" if args.model else " Train the tiny-world model first: python -m rice_mllm.tiny_world"
        print(f"error: {model_dir} is not a kit checkpoint (no config.json).{hint}", file=sys.stderr)
        return 2
    model, processor = load_for_inference(model_dir, args.device, args.dtype, args.load_4bit)
    generation = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p}
    session = ChatSession(model, processor, generation)
    try:
        for path in args.image:
            session.attach(path)
        if args.prompt is not None:
            print(session.ask(args.prompt))
            return 0
    except ChatInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    repl(session)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
