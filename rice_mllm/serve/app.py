"""The ASGI app (Starlette): `POST /v1/chat/completions` (JSON or SSE stream), `GET /v1/models`, `GET /health`, and
the chat page at `/`.

A request is checked and rendered (images decoded, tokens counted) before it reaches the model thread, so a bad one
never enters a batch: it gets an OpenAI-style JSON error with a 4xx status, and the server goes on as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import time
from dataclasses import dataclass, field

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from ..mllm.processing import SampleTooLongError
from .batching import MAX_BATCH, MAX_PADDING, WAIT_S, Batcher, Job
from .errors import ApiError
from .images import ImagePolicy, load_image
from .page import PAGE
from .protocol import ChatRequest, Sampling, chunk_body, completion_body, completion_id, parse_chat_request, usage

logger = logging.getLogger(__name__)
# Requests decoding images and rendering prompts at once: the CPU work is bounded by the cores anyway, and each may
# hold up to max_images decoded images in memory.
MAX_RENDERS = 4


@dataclass(frozen=True)
class ServeOptions:
    """What the server answers and refuses (the command line's options; see `cli.parse_args`).

    Args:
        model_name: the id `/v1/models` lists; requests naming another model get a 404.
        api_key: when set, `/v1/*` requires `Authorization: Bearer <api_key>`.
        max_images: most images in one request (checked before any is decoded).
        context_length: prompt + max_tokens limit; None: the LLM's max_position_embeddings.
        max_tokens, temperature: defaults for requests that omit them.
        max_body_bytes: larger request bodies get a 413.
        max_batch, batch_wait_s, max_padding: see `batching.Batcher`.
    """

    model_name: str
    api_key: str | None = None
    images: ImagePolicy = field(default_factory=ImagePolicy)
    max_images: int = 8
    context_length: int | None = None
    max_tokens: int = 256
    temperature: float = 0.0
    max_body_bytes: int = 32 * 2**20
    max_batch: int = MAX_BATCH
    batch_wait_s: float = WAIT_S
    max_padding: float = MAX_PADDING


def _authorize(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")


async def _read_json(request: Request, limit: int) -> object:
    """The decoded JSON body. An oversized body is read to its end (to 8x the limit) but not kept, so that the client,
    still sending, reads the 413 instead of a connection reset."""
    too_large = ApiError(413, f"the request body is over {limit:,} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > 8 * limit:
        raise too_large
    body, size = bytearray(), 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            body += chunk
        elif size > 8 * limit:
            break
    if size > limit:
        raise too_large
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ApiError(400, f"the request body is not valid JSON: {str(error)[:200]}", code="invalid_json") from None


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def create_app(model, processor, options: ServeOptions) -> Starlette:
    """The server over a loaded model and processor (`inference.load_for_inference`). `app.state.batcher` is the
    model thread (started and stopped with the app's lifespan)."""
    batcher = Batcher(model, processor, options.max_batch, options.batch_wait_s, options.max_padding)
    context = options.context_length or model.config.text_config.max_position_embeddings
    created = int(time.time())
    card = {"id": options.model_name, "object": "model", "created": created, "owned_by": "rice_mllm"}

    limits: dict[str, anyio.CapacityLimiter] = {}  # made in the lifespan: anyio 3 wants a running event loop

    def render(chat: ChatRequest) -> tuple[dict, int, Sampling]:
        """Decode the images and render the prompt (in a worker thread); the sampling with max_tokens resolved."""
        images = [load_image(url, options.images, where) for url, where in chat.image_urls]
        try:
            sample = processor(chat.messages, images, add_generation_prompt=True)
        except SampleTooLongError as error:
            raise ApiError(400, str(error), "messages", "context_length_exceeded") from None
        prompt_tokens = len(sample["input_ids"])
        max_tokens = chat.sampling.max_tokens or max(1, min(options.max_tokens, context - prompt_tokens))
        if prompt_tokens + max_tokens > context:
            raise ApiError(
                400,
                f"this model's context is {context} tokens; the messages take {prompt_tokens} (images included) "
                f"and {max_tokens} more were asked for",
                "messages",
                "context_length_exceeded",
            )
        return sample, prompt_tokens, dataclasses.replace(chat.sampling, max_tokens=max_tokens)

    async def chat_completions(request: Request):
        _authorize(request, options.api_key)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event: tuple) -> None:  # called from the model thread
            with contextlib.suppress(RuntimeError):  # the loop closed: the server is shutting down
                loop.call_soon_threadsafe(events.put_nowait, event)

        with batcher.preparing():
            body = await _read_json(request, options.max_body_bytes)
            name = body.get("model") if isinstance(body, dict) else None
            if isinstance(name, str) and name != options.model_name:
                message = f"the model {name!r} does not exist; this server serves {options.model_name!r}"
                raise ApiError(404, message, "model", "model_not_found")
            chat = parse_chat_request(body, options.temperature, options.max_images)
            sample, prompt_tokens, sampling = await anyio.to_thread.run_sync(render, chat, limiter=limits["renders"])
        job = Job(sample, sampling, emit, stream=chat.stream)
        batcher.submit(job)
        reply_id = completion_id()
        if chat.stream:
            stream = _stream(job, events, reply_id, prompt_tokens, chat.include_usage)
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            event = await events.get()
        finally:
            job.cancel()  # a no-op once the row ended; stops it when this request was cancelled
        if event[0] == "error":
            raise event[1]
        _, reason, generated, text = event
        reply = completion_body(reply_id, options.model_name, text, reason, usage(prompt_tokens, generated))
        return JSONResponse(reply)

    async def _stream(job: Job, events: asyncio.Queue, reply_id: str, prompt_tokens: int, include_usage: bool):
        name = options.model_name
        try:
            yield _sse(chunk_body(reply_id, name, {"role": "assistant", "content": ""}))
            while (event := await events.get())[0] == "delta":
                yield _sse(chunk_body(reply_id, name, {"content": event[1]}))
            if event[0] == "error":
                yield _sse(event[1].body())
            else:
                counts = usage(prompt_tokens, event[2])
                yield _sse(chunk_body(reply_id, name, {}, event[1], counts))
                if include_usage:
                    yield _sse(chunk_body(reply_id, name, None, counts=counts))
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # the client left mid-stream: its row stops at the next token

    async def models(request: Request):
        _authorize(request, options.api_key)
        return JSONResponse({"object": "list", "data": [card]})

    async def model_card(request: Request):
        _authorize(request, options.api_key)
        if request.path_params["model"] != options.model_name:
            raise ApiError(
                404, f"the model {request.path_params['model']!r} does not exist", "model", "model_not_found"
            )
        return JSONResponse(card)

    async def health(request: Request):
        sizes = dict(sorted(batcher.batch_sizes.items()))  # generates run so far, by batch size
        return JSONResponse({"status": "ok", "model": options.model_name, "batch_sizes": sizes})

    async def page(request: Request):
        return HTMLResponse(PAGE)

    async def api_error(request: Request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status)

    async def http_error(request: Request, error: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return JSONResponse(ApiError(error.status_code, str(error.detail), code=code).body(), error.status_code)

    async def server_error(request: Request, error: Exception):
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=error)
        return JSONResponse(ApiError(500, "internal server error; see the server log").body(), status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        limits["renders"] = anyio.CapacityLimiter(MAX_RENDERS)
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    routes = [
        Route("/", page),
        Route("/health", health),
        Route("/v1/models", models),
        Route("/v1/models/{model:path}", model_card),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]
    handlers = {ApiError: api_error, HTTPException: http_error, Exception: server_error}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.state.batcher = batcher
    return app
