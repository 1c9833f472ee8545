"""`python -m rice_mllm.serve`: load a kit checkpoint and serve it (OpenAI API + chat page) with uvicorn.

The model is found as chat finds it: `--model DIR` (a run, checkpoint or model folder), else the tiny world's.
Invariant: load errors cost one line on stderr and exit status 2, before any port is opened.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from ..chat import DEFAULT_MODEL, LOAD_ERRORS, model_dir_of
from ..inference import MAX_IMAGE_PIXELS, load_for_inference
from .batching import MAX_BATCH, MAX_PADDING, WAIT_S

API_KEY_ENV = "RICE_MLLM_API_KEY"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rice_mllm.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help=f"kit checkpoint directory (default: {DEFAULT_MODEL})")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--load-4bit", action="store_true", help="4-bit NF4 LLM (bitsandbytes); encoder kept as is")
    parser.add_argument("--served-model-name", help="the model id clients send (default: the --model path as given)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV}; unset: no key)",
    )
    parser.add_argument("--image-root", type=Path, help="serve image paths and file:// URLs from this folder only")
    parser.add_argument("--allow-remote-images", action="store_true", help="fetch http(s):// image URLs")
    parser.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS)
    parser.add_argument("--max-images", type=int, default=8, help="most images in one request")
    parser.add_argument("--context-length", type=int, help="prompt + max_tokens limit (default: the LLM's)")
    parser.add_argument("--max-tokens", type=int, default=256, help="default max_tokens of a request")
    parser.add_argument("--temperature", type=float, default=0.0, help="default temperature (0 = greedy)")
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH, help="most requests in one generate")
    parser.add_argument(
        "--batch-wait-ms", type=float, default=WAIT_S * 1000, help="how long a free model waits for a batch to fill"
    )
    parser.add_argument(
        "--max-padding", type=float, default=MAX_PADDING, help="most padding in a batch, a fraction of its positions"
    )
    parser.add_argument("--max-request-mb", type=float, default=32.0, help="largest request body")
    return parser.parse_args(argv)


def options_from_args(args: argparse.Namespace, model_dir: Path):
    from .app import ServeOptions
    from .images import ImagePolicy

    if args.image_root is not None and not args.image_root.is_dir():
        raise ValueError(f"--image-root {args.image_root} is not a folder")
    return ServeOptions(
        model_name=args.served_model_name or str(model_dir),
        api_key=args.api_key or None,
        images=ImagePolicy(args.image_root, args.allow_remote_images, args.max_image_pixels),
        max_images=args.max_images,
        context_length=args.context_length,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        max_body_bytes=int(args.max_request_mb * 2**20),
        max_batch=args.max_batch,
        batch_wait_s=args.batch_wait_ms / 1000,
        max_padding=args.max_padding,
    )


@contextlib.contextmanager
def serving(app, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` with uvicorn in a background thread (port 0: a free port); yields its base URL, stops on exit."""
    import uvicorn

    listener = socket.create_server((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server stopped while starting; see its log")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()
        listener.close()


def main(argv: list[str] | None = None) -> int:
    """Serve until interrupted. Returns the exit status: 0, or 2 with a message on stderr."""
    args = parse_args(argv)
    try:
        import uvicorn

        from .app import create_app
    except ImportError as error:
        print(f"error: {error.name} is missing: pip install -e '.[serve]'", file=sys.stderr)
        return 2
    try:
        model_dir = model_dir_of(args.model)
        options = options_from_args(args, model_dir)
        model, processor = load_for_inference(model_dir, args.device, args.dtype, args.load_4bit)
    except LOAD_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"rice_mllm serve: {options.model_name} on {model.device}; chat page at http://{args.host}:{args.port}/, "
        f"OpenAI API at http://{args.host}:{args.port}/v1",
        flush=True,
    )
    uvicorn.run(create_app(model, processor, options), host=args.host, port=args.port, log_level="info")
    return 0
