"""One model thread answers every request: those that arrive while it is busy are answered together in one
left-padded `generate` (up to `max_batch`, after a short wait window when it was idle).

Invariant: each reply equals the reply its request gets alone. Greedy rows are untouched by their neighbours (the
left-padded batch of `inference.batch_samples`); each row stops at its own max_tokens and stop strings; a sampled row
draws from its own generator, seeded by its request, so a seeded request gets the same reply alone or in any batch
(up to float rounding of the logits, which batching can change in the last bit).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from ..inference import ReplyDecoder, batch_samples, generation_settings
from .errors import ApiError
from .protocol import Sampling

logger = logging.getLogger(__name__)
# While requests are being read and rendered (a few ms each), the batch waits longer for them: under load, clients
# whose replies just went out send their next requests together, and a batch started without them is a small one.
PREPARING_WAIT_FACTOR = 4
# Defaults of the server's batching options (measured with scripts/bench_serve.py, see BENCHMARKS.md).
MAX_BATCH, WAIT_S, MAX_PADDING = 16, 0.01, 0.3


@dataclass
class Job:
    """One request, rendered. From the model thread, `emit` receives ("delta", text) pieces (only when `stream`),
    then ("end", finish_reason, completion_tokens, whole reply) or ("error", ApiError). `cancel()` (the client
    left) ends its row at the next token."""

    sample: dict[str, torch.Tensor]  # the processor's output with add_generation_prompt=True
    sampling: Sampling  # max_tokens resolved to an int
    emit: Callable[[tuple], None]
    stream: bool = True
    arrived: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


class Row:
    """A job's reply as its tokens arrive: text released as it becomes stable, cut at the first stop string (text
    that could begin one is held back), ended by `<|im_end|>`, max_tokens, a stop string or cancellation."""

    def __init__(self, job: Job, tokenizer, eos: int) -> None:
        self.job, self.eos = job, eos
        self.decoder = ReplyDecoder(tokenizer)
        self.held = ""  # released by the decoder, held back as the possible start of a stop string
        self.text = ""  # sent so far
        self.generated = 0
        self.done = False

    def push(self, token: int) -> None:
        if self.done:  # generate pads finished rows
            return
        if self.job.cancelled.is_set():
            self.done = True
            return
        self.generated += 1
        if token == self.eos:
            self.end("stop")
            return
        self._offer(self.decoder.push([token]), final=False)
        if not self.done and self.generated >= self.job.sampling.max_tokens:
            self.end("length")

    def end(self, reason: str) -> None:
        if self.done or self._offer(self.decoder.finish(), final=True):  # _offer ends the row at a stop string
            return
        self.done = True
        self.job.emit(("end", reason, self.generated, self.text))

    def _offer(self, piece: str, final: bool) -> bool:
        """Send what is safe of held + piece; True when a stop string was found (the row is then ended)."""
        text, stops = self.held + piece, self.job.sampling.stop
        cut = min((index for stop in stops if (index := text.find(stop)) >= 0), default=None)
        if cut is not None:
            self._send(text[:cut])
            self.done = True
            self.job.emit(("end", "stop", self.generated, self.text))
            return True
        keep = 0 if final else _longest_stop_prefix(text, stops)
        self._send(text[: len(text) - keep])
        self.held = text[len(text) - keep :]
        return False

    def _send(self, text: str) -> None:
        self.text += text
        if text and self.job.stream:  # a non-streamed reply is sent whole, with "end": one wake-up of the loop
            self.job.emit(("delta", text))


def _longest_stop_prefix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that begins a stop string (and may become one with the next piece)."""
    return max((n for stop in stops for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)


class RowTracker(StoppingCriteria):
    """Feeds every new token to its row and tells generate which rows are done. A stopping criterion, not a streamer:
    generate calls it once per step with the new tokens, before it decides which rows go on."""

    def __init__(self, rows: Sequence[Row]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        for row, token in zip(self.rows, input_ids[:, -1].tolist(), strict=True):
            row.push(token)
        return torch.tensor([row.done for row in self.rows], device=input_ids.device)


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Temperature, then nucleus filtering (transformers' TopPLogitsWarper: keep the smallest set of tokens whose
    probability reaches top_p), then one draw from `generator`. logits: [V]."""
    logits = logits.float().cpu() / temperature
    if top_p < 1.0:
        ordered, order = logits.sort()  # ascending
        tail = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
        tail[-1] = False  # the most likely token always stays
        logits[order[tail]] = -float("inf")
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


class RowSampler(LogitsProcessor):
    """Draws each sampled row's token from that row's own generator and leaves only it; greedy rows (no generator)
    are untouched. generate itself then runs greedy, so no draw depends on the other rows of the batch."""

    def __init__(self, samplings: Sequence[Sampling]) -> None:
        self.rows = [
            (s.temperature, s.top_p, torch.Generator().manual_seed(s.seed % 2**64)) if s.temperature > 0 else None
            for s in samplings
        ]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for index, row in enumerate(self.rows):
            if row is not None:
                token = sample_token(scores[index], *row)
                scores[index] = -float("inf")
                scores[index, token] = 0.0
        return scores


def select_batch(lengths: Sequence[int], max_batch: int, max_padding: float) -> list[int]:
    """Indices of the batch that item 0 (the oldest request) heads: the others nearest to it in prompt length first,
    each taken while padding stays at most `max_padding` of the batch's positions (1.0: any mix)."""
    chosen, longest, total = [0], lengths[0], lengths[0]
    for index in sorted(range(1, len(lengths)), key=lambda i: (abs(lengths[i] - lengths[0]), i)):
        if len(chosen) == max_batch:
            break
        wider = max(longest, lengths[index])
        if 1 - (total + lengths[index]) / (wider * (len(chosen) + 1)) <= max_padding:
            chosen.append(index)
            longest, total = wider, total + lengths[index]
    return sorted(chosen)


class Batcher:
    """The model thread. `submit` is thread-safe; `start` and `stop` bracket the server's life.

    Args:
        max_batch: most requests in one generate.
        wait_s: how long a free model waits for a batch to fill, from the later of the oldest waiting request's
            arrival and the end of the last generate; PREPARING_WAIT_FACTOR times longer while requests are being
            read and rendered (see `preparing`).
        max_padding: most padding a batch may hold, as a fraction of its positions. Prompts of very different lengths
            (a text-only question and a four-tile image) are then answered in different batches: a padded position
            costs as much as a real one in every step, so mixing them can make batching slower than no batching.
    """

    def __init__(
        self, model, processor, max_batch: int = MAX_BATCH, wait_s: float = WAIT_S, max_padding: float = MAX_PADDING
    ) -> None:
        if max_batch < 1 or wait_s < 0 or not 0 <= max_padding <= 1:
            raise ValueError(
                f"need max_batch >= 1, wait_s >= 0 and 0 <= max_padding <= 1; got {max_batch}, {wait_s}, {max_padding}"
            )
        self.model, self.processor = model, processor
        self.max_batch, self.wait_s, self.max_padding = max_batch, wait_s, max_padding
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.backlog: list[Job] = []  # off the queue, not answered yet, oldest first (model thread only)
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()
        self.in_preparation = 0  # requests read or rendered now (see `preparing`)
        self.free_since = 0.0  # when the last generate ended
        self.batch_sizes: Counter[int] = Counter()  # generates run, by batch size

    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="rice_mllm-batcher", daemon=True)
            self.thread.start()

    def stop(self) -> None:
        if self.thread is not None:
            self.jobs.put(None)
            self.thread.join()
            self.thread = None

    def submit(self, job: Job) -> None:
        if job.sampling.temperature > 0 and job.sampling.seed is None:
            job.sampling = dataclasses.replace(job.sampling, seed=secrets.randbits(63))
        self.jobs.put(job)

    @contextlib.contextmanager
    def preparing(self) -> Iterator[None]:
        """Marks a request being read and rendered, which a free model waits for (see the class's `wait_s`)."""
        with self.lock:
            self.in_preparation += 1
        try:
            yield
        finally:
            with self.lock:
                self.in_preparation -= 1

    def _fill_backlog(self) -> bool:
        """Queue -> backlog: a job to head the batch (waiting for one), then every job already queued or arriving
        within the wait window (see the class). False once `stop` was called."""
        if not self.backlog:
            if (job := self.jobs.get()) is None:
                return False
            self.backlog.append(job)
        while len(self.backlog) < 4 * self.max_batch:  # enough to choose from
            now = time.monotonic()
            window = self.wait_s * (PREPARING_WAIT_FACTOR if self.in_preparation else 1)
            wait = max(self.backlog[0].arrived, self.free_since) + window - now
            waiting = wait > 0 and len(self.backlog) < self.max_batch
            try:
                job = self.jobs.get(timeout=wait) if waiting else self.jobs.get_nowait()
            except queue.Empty:
                return True
            if job is None:
                return False
            self.backlog.append(job)
        return True

    def _run(self) -> None:
        while self._fill_backlog():
            lengths = [len(job.sample["input_ids"]) for job in self.backlog]
            chosen = set(select_batch(lengths, self.max_batch, self.max_padding))
            batch = [job for index, job in enumerate(self.backlog) if index in chosen]
            self.backlog = [job for index, job in enumerate(self.backlog) if index not in chosen]
            self._answer(batch)
            self.free_since = time.monotonic()
        # Stopped: the batch in progress was answered; the rest is refused, not left hanging.
        while not self.jobs.empty():
            if (job := self.jobs.get()) is not None:
                self.backlog.append(job)
        for job in self.backlog:
            job.emit(("error", ApiError(503, "the server is shutting down")))
        self.backlog = []

    def _answer(self, jobs: list[Job]) -> None:
        self.batch_sizes[len(jobs)] += 1
        settings = generation_settings(self.processor, max(job.sampling.max_tokens for job in jobs), 0.0, 1.0)
        rows = [Row(job, self.processor.tokenizer, settings["eos_token_id"]) for job in jobs]
        samplings = [job.sampling for job in jobs]
        extra = {}
        if any(sampling.temperature > 0 for sampling in samplings):
            extra["logits_processor"] = LogitsProcessorList([RowSampler(samplings)])
        try:
            inputs = batch_samples(
                self.processor, [job.sample for job in jobs], self.model.device, self.model.vision_tower.dtype
            )
            self.model.generate(
                **inputs, **settings, **extra, stopping_criteria=StoppingCriteriaList([RowTracker(rows)])
            )
            for row in rows:
                row.end("length")
        except Exception:  # one failed batch must not take the server down: its requests get a 500
            logger.exception("generate failed for a batch of %d", len(jobs))
            for row in rows:
                if not row.done:
                    row.done = True
                    row.job.emit(("error", ApiError(500, "the model failed on this request; see the server log")))
