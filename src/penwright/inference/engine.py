"""Continuous batching: one decoding loop over slots that requests enter and leave.

``Engine.load("artifacts/onnx", slots=16)`` opens an exported graph. A request takes the lowest free
slot; the prompts admitted at one step are prefilled together; then every ``step()`` feeds one token
for each running row at once. A row leaves at EOS, a stop string, ``max_tokens``, the end of the
context, a cancel or its deadline, freeing its slot for the next request at the next step. Each row
keeps its own length, sampling parameters and random stream, so a seeded request gives the same text
alone or beside others, on any graph.

The graph itself runs in a runner (``penwright.inference.runner``): penwright's fused graph on the CPU in the
slot runner (one key/value buffer per layer, rows in place, nothing copied as rows come and go);
every other graph the export writes (lean, traced, fp16) and every graph on CUDA in the padded
runner (the standard inputs, rows left-padded into one batch, the cache on the device).

Everything that generates text runs here: ``penwright generate``, ``chain``, ``score``, the
benchmarks (``Engine.generate`` / ``Engine.generate_ids``: submit, step until done) and
``penwright serve`` (``Engine.run_forever`` on a thread).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from penwright.core.errors import InvalidValue, PenwrightError
from penwright.inference.runner import GRAPH, PaddedRunner, SlotRunner, open_session, read_beside_graph
from penwright.inference.sampling import SAMPLED, SamplingConfig, log_softmax, next_tokens_per_row, top_logprobs
from penwright.inference.text import Decoder, RowText

__all__ = ["GRAPH", "Engine", "Request", "TokenScore"]
SCORE_CHUNK = 256  # prompt positions log-softmaxed at once when a prompt is scored (bounds the temporary memory)


class TokenScore(NamedTuple):
    """A token, its log-probability under the model (log-softmax of the raw logits, before temperature, filters
    or bias; None for a prompt's first token, which nothing predicts) and the most likely tokens there."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass(eq=False)
class Request:
    """One sequence to generate. ``emit(text, finish_reason)`` is called from the engine's thread with
    each new piece of text (finish_reason None), then once with the rest and the reason it ended:
    ``stop`` (EOS or a stop string), ``length`` (max_tokens or the context), ``cancelled``, ``timeout``."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    seed: int | list[int] | None = None  # the row's own random stream (None: fresh entropy)
    stop_at_eos: bool = True
    deadline: float | None = None  # time.monotonic() after which the request ends with "timeout"
    emit: Callable[[str, str | None], None] | None = None
    stream: bool = True  # emit the text as it grows (False: once, at the end, with all of it)
    logprobs: int | None = None  # score each generated token, with this many most likely beside it (None: off)
    score_prompt: bool = False  # score the prompt's tokens too (its every position's logits at prefill)
    logit_bias: Mapping[int, float] | None = None  # token id -> added to its raw logit before sampling
    # filled in by the engine
    tokens: list[int] = field(default_factory=list)
    scores: list[TokenScore] = field(default_factory=list)  # a generated token's each (an ending EOS included)
    prompt_scores: list[TokenScore] = field(default_factory=list)  # the prompt's, when score_prompt
    text: str = ""
    finish_reason: str | None = None
    cancelled: bool = False
    queued_at: float | None = None  # time.monotonic() at submit
    first_token_at: float | None = None

    def cancel(self) -> None:
        """Ask the engine to free this request's slot at its next step (thread-safe: one flag)."""
        self.cancelled = True

    def given_up(self, now: float) -> str | None:
        """``timeout`` once the deadline has passed (even if the caller cancelled it after that, as a server
        does when it stops waiting), else ``cancelled`` if cancelled, else None: the request goes on."""
        if self.deadline and now > self.deadline:
            return "timeout"
        return "cancelled" if self.cancelled else None


class _Row:
    """A request in its slot: its length in the cache, the token to feed next, its sampler state, its text."""

    def __init__(self, request: Request, slot: int, vocab: int, decoder: Decoder):
        self.request, self.slot = request, slot
        self.length = 0  # tokens in the slot's cache
        self.pending = -1  # sampled, not yet fed
        self.rng = np.random.default_rng(request.seed)
        self.seen = None
        if request.sampling.repetition_penalty != 1.0:
            self.seen = np.zeros((1, vocab), dtype=bool)
            self.seen[0, request.prompt_ids] = True
        self.text = RowText(decoder, request.stop)
        self.bias = None
        if request.logit_bias:
            self.bias = (
                np.array(list(request.logit_bias), dtype=np.int64),
                np.array(list(request.logit_bias.values()), dtype=np.float32),
            )
        self.step_logprobs: tuple[np.ndarray, list] | None = None  # this step's log-softmax and top tokens


class Engine:
    def __init__(self, runner: SlotRunner | PaddedRunner, tokenizer, provider: str = "cpu"):
        self.runner, self.tokenizer = runner, tokenizer
        self.provider = provider  # what runs the graph: "cpu" or "cuda"
        self.context, self.slots, self.vocab = runner.context, runner.slots, runner.vocab
        self.eos = int(tokenizer.eos_token_id)
        self.decoder = Decoder(tokenizer)
        self.rows: list[_Row | None] = [None] * self.slots
        self.waiting: queue.Queue[Request] = queue.Queue()
        self._stop = threading.Event()
        self._work = threading.Event()

    # -- loading ----------------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        path: str | Path,
        slots: int = 16,
        threads: int = 0,
        graph: str = GRAPH,
        context: int | None = None,
        spin: bool = True,
        provider: str = "cpu",
        device_id: int = 0,
        padded: bool = False,
        lone_threads: int | None = None,
    ) -> Engine:
        """The engine on ``path/graph``: the slot runner for penwright's fused graph on the CPU, the padded
        runner for any other graph, for CUDA (``provider="cuda"``; it falls back to the CPU when CUDA cannot
        run, and ``Engine.provider`` says so), or when ``padded`` asks for it (the CUDA path, on the CPU).

        ``lone_threads`` (the slot runner only; None: off): a second session of the same graph, on that many
        threads (0: every core), takes every run of a single row (a prompt, a decoding step), its workers at
        idle priority (``open_session``). A small model on one thread leaves a core to the server under load,
        but a request alone then gets one core too (the quickstart: ~0.85x the tokens/s of two); this gives it
        the free cores back, and a worker still spinning when a burst arrives takes nothing from the burst."""
        import onnx

        from penwright.core.files import short
        from penwright.inference.slot_graph import slot_graph

        path = Path(path)
        file = path / graph
        if not file.is_file():
            raise PenwrightError(f"{file}: not found. Export a model first: `penwright export`")
        if slots < 1:
            raise InvalidValue("slots", slots, "the engine needs at least one slot")

        def unreadable(err: Exception) -> PenwrightError:  # protobuf's DecodeError, truncated weights, ...
            return PenwrightError(
                f"{file}: cannot be read as an ONNX graph ({type(err).__name__}: {short(err, 300)}); "
                f"re-export it with `penwright export`"
            )

        try:
            model = onnx.load(str(file), load_external_data=False)  # the nodes: is it the fused graph?
        except Exception as err:
            raise unreadable(err) from None
        half = any(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for i in model.graph.input)
        # the slot runner's buffers are fp32: an fp16 graph runs padded, as every graph does on CUDA
        fused = not padded and not half and any(n.op_type == "MultiHeadAttention" for n in model.graph.node)
        source, ran = str(file), provider
        if provider == "cuda":  # every graph runs padded there (the slot graph's attention is CPU-only in fp32)
            session, ran = open_session(source, file, threads, "cuda", device_id, spin)
        if ran == "cpu" and fused:
            try:
                model = onnx.load(str(file))
                source = slot_graph(model).SerializeToString()
            except ValueError:  # a fused graph the rewrite cannot take (a head size GroupQueryAttention lacks)
                fused = False
            except Exception as err:  # the external weights are missing or truncated
                raise unreadable(err) from None
        lone = None
        if ran == "cpu":
            session, _ = open_session(source, file, threads, "cpu", 0, spin)
            if fused and lone_threads is not None:
                lone, _ = open_session(source, file, lone_threads, "cpu", 0, spin, idle_workers=True)
        config, tokenizer = read_beside_graph(path, session)
        window = min(int(context or config["n_positions"]), int(config["n_positions"]))
        eos = int(tokenizer.eos_token_id)
        runner: SlotRunner | PaddedRunner
        if ran == "cpu" and fused:
            runner = SlotRunner(session, config, slots, window, eos, lone_session=lone)
        else:
            runner = PaddedRunner(session, config, slots, window, eos, device=ran, device_id=device_id)
        return cls(runner, tokenizer, provider=ran)

    @property
    def session(self):
        return self.runner.session

    @session.setter
    def session(self, session) -> None:  # the tests wrap it (slow it down, make it fail once): every step runs it
        self.runner.session = session
        if hasattr(self.runner, "lone_session"):
            self.runner.lone_session = None

    def cache_bytes(self) -> int:
        return self.runner.cache_bytes()

    def _score_prompt(self, request: Request, logits: np.ndarray) -> None:
        """Each prompt token's logprob from the position before it ([prompt, vocab] logits), in chunks."""
        ids, n = request.prompt_ids, request.logprobs or 0
        request.prompt_scores = [TokenScore(ids[0], None, [])]
        for lo in range(0, len(ids) - 1, SCORE_CHUNK):
            hi = min(lo + SCORE_CHUNK, len(ids) - 1)
            logprobs = log_softmax(logits[lo:hi])
            chosen = logprobs[np.arange(hi - lo), ids[lo + 1 : hi + 1]].tolist()
            for token, lp, top in zip(ids[lo + 1 : hi + 1], chosen, top_logprobs(logprobs, n)):
                request.prompt_scores.append(TokenScore(token, lp, top))

    # -- requests ---------------------------------------------------------------------------------

    def check(self, prompt_ids: list[int], max_tokens: int, score_prompt: bool = False) -> None:
        """Refuse what cannot fit before it is queued (the server turns this into a 400). A scored prompt
        may ask for no new tokens."""
        if not prompt_ids:
            raise InvalidValue("prompt", [], "the prompt has no tokens")
        bad = next((i for i, t in enumerate(prompt_ids) if not 0 <= t < self.vocab), None)
        if bad is not None:
            raise InvalidValue(
                f"prompt[{bad}]", prompt_ids[bad], f"token ids go from 0 to {self.vocab - 1} for this model"
            )
        if max_tokens < (0 if score_prompt else 1):
            raise InvalidValue("max_tokens", max_tokens, f"must be >= {0 if score_prompt else 1}")
        if len(prompt_ids) + max_tokens > self.context:
            raise InvalidValue(
                "max_tokens",
                max_tokens,
                f"with a prompt of {len(prompt_ids)} tokens it exceeds the context of {self.context} tokens; "
                "shorten the prompt or lower it",
            )

    def encode(self, prompt: str) -> list[int]:
        """A prompt's ids; an empty prompt starts from <|endoftext|> (an unconditional sample)."""
        return self.tokenizer.encode(prompt or self.tokenizer.eos_token, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.decoder.decode(list(ids))

    def token_texts(self, ids: list[int]) -> list[str]:
        """Each token's own text (a piece of a multi-byte character shows as U+FFFD, as in vLLM's logprobs)."""
        return self.decoder.token_texts(ids)

    def submit(self, request: Request) -> Request:
        self.check(request.prompt_ids, request.max_tokens, request.score_prompt)
        try:
            np.random.SeedSequence(request.seed)
        except (TypeError, ValueError):
            raise InvalidValue("seed", request.seed, "must be a non-negative integer") from None
        request.queued_at = time.monotonic()
        self.waiting.put(request)
        self._work.set()
        return request

    @property
    def running(self) -> int:
        return self.slots - self.rows.count(None)

    # -- one step ---------------------------------------------------------------------------------

    def step(self) -> int:
        """Admit waiting requests into free slots and prefill them, again while more arrive meanwhile (a burst
        of requests gets its first tokens before the running rows take their next step), then one decoding step
        for every running row. Returns the number of rows running after the step."""
        now = time.monotonic()
        for row in self.rows:  # cancelled or late rows leave before the step
            if row is not None and (reason := row.request.given_up(now)):
                self._finish(row, reason)
        admissions = 0
        while admissions < self.slots and (admitted := self._admit(now)):  # (bounded: prompts scored alone end at
            self._prefill(admitted)  # prefill and free their slots, and must not keep the running rows waiting)
            admissions += len(admitted)
            now = time.monotonic()
        active = [r for r in self.rows if r is not None]  # in slot order
        if not active:
            return 0
        rows, logits = self.runner.decode(active)
        for r in rows:
            r.length += 1
        self._sample(rows, logits)
        return self.running

    def _admit(self, now: float) -> list[_Row]:
        """Waiting requests into the free slots: the shortest prompts in the lowest slots, so that prompts of
        similar length share a prefill run (fewer padded tokens)."""
        free = [i for i, r in enumerate(self.rows) if r is None]
        taken: list[Request] = []
        while len(taken) < len(free):
            try:
                request = self.waiting.get_nowait()
            except queue.Empty:
                break
            if reason := request.given_up(now):  # gave up while waiting
                request.finish_reason = reason
                if request.emit is not None:
                    request.emit("", request.finish_reason)
                continue
            taken.append(request)
        taken.sort(key=lambda q: len(q.prompt_ids))
        admitted: list[_Row] = []
        for slot, request in zip(free, taken):
            try:
                row = _Row(request, slot, self.vocab, self.decoder)
            except Exception:  # a request the engine cannot start ends alone; the others run on
                request.finish_reason = "error"
                if request.emit is not None:
                    request.emit("", "error")
                continue
            self.rows[slot] = row
            admitted.append(row)
        return admitted

    def _prefill(self, admitted: list[_Row]) -> None:
        """Run the admitted prompts (in the runner's prefill runs) and sample each row's first token."""
        for batch in self.runner.batches(admitted):
            logits = self.runner.prefill(batch)  # [rows, picked, vocab]
            if batch[0].request.score_prompt:  # alone in its run: every position's logits
                self._score_prompt(batch[0].request, logits[0])
            logits = logits[:, -1]
            live = [i for i, r in enumerate(batch) if r.request.max_tokens > 0]
            for r in batch:
                if r.request.max_tokens == 0:  # a prompt scored, nothing to generate
                    self._finish(r, "length")
            if live:
                self._sample([batch[i] for i in live], logits[live] if len(live) < len(batch) else logits)

    def _sample(self, rows: list[_Row], logits: np.ndarray) -> None:
        """Each row's next token from its logits ([len(rows), vocab]); rows with the same sampling settings
        share one batched call, each drawing from its own stream (the token it would get alone). Rows that
        asked for logprobs get them from the raw logits first; then bias and min_tokens change the logits
        (the step's own buffer) in place."""
        scored = [i for i, r in enumerate(rows) if r.request.logprobs is not None]
        if scored:
            logprobs = log_softmax(logits[scored])
            tops = top_logprobs(logprobs, max(rows[i].request.logprobs or 0 for i in scored))
            for j, i in enumerate(scored):
                rows[i].step_logprobs = (logprobs[j], tops[j][: rows[i].request.logprobs])
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(rows):
            req = r.request
            if r.bias is not None:
                logits[i, r.bias[0]] += r.bias[1]
            if len(req.tokens) < req.min_tokens:  # min_tokens: <|endoftext|> is not allowed yet
                logits[i, self.eos] = -np.inf
            groups.setdefault((req.sampling, r.seen is not None), []).append(i)
        if len(groups) == 1:  # one group (the usual case): the step's logits as they are, no copy
            cfg, penalized = next(iter(groups))
            if not cfg.do_sample and not penalized:  # all greedy: the argmax
                tokens = logits.argmax(axis=-1)
            else:
                seen = np.concatenate([r.seen for r in rows]) if penalized else None
                tokens = next_tokens_per_row(logits, cfg, [r.rng for r in rows], seen)
        else:
            tokens = np.empty(len(rows), dtype=np.int64)
            for (cfg, penalized), idx in groups.items():
                seen = np.concatenate([rows[i].seen for i in idx]) if penalized else None
                tokens[idx] = next_tokens_per_row(logits[idx], cfg, [rows[i].rng for i in idx], seen)
        for row, token in zip(rows, tokens.tolist()):
            self._advance(row, token)

    def _advance(self, row: _Row, token: int) -> None:
        """Append a sampled token: detokenize it, check stop strings and limits, stream the new text."""
        req = row.request
        if req.first_token_at is None:
            req.first_token_at = time.monotonic()
        if row.step_logprobs is not None:
            logprobs, top = row.step_logprobs
            req.scores.append(TokenScore(token, float(logprobs[token]), top))
            row.step_logprobs = None
        if req.stop_at_eos and token == self.eos:
            return self._finish(row, "stop")
        req.tokens.append(token)
        if row.seen is not None:
            row.seen[0, token] = True
        row.pending = token
        if (req.stop or (req.emit is not None and req.stream)) and self._detokenize(row):  # read as it grows
            return  # a stop string ended it
        if len(req.tokens) >= req.max_tokens or row.length + 1 >= self.context:
            return self._finish(row, "length")  # (without a reader, the text is decoded once, here)

    def _detokenize(self, row: _Row) -> bool:
        """The text the new token completes (``penwright.inference.text``), then stream what is safe to show.
        True when a stop string ended the request."""
        req = row.request
        stopped = row.text.grow(req.tokens)
        req.text = row.text.text
        if stopped:
            # (a decoder whose pieces need not add up to the whole, e.g. one cleaning up spaces: decode it whole)
            self._finish(row, "stop", final=not self.decoder.concatenates)
            return True
        if len(req.tokens) >= req.max_tokens or row.length + 1 >= self.context:
            return False  # _advance finishes it, decoding the whole text
        if req.emit is not None and req.stream:
            piece = row.text.showable()
            if piece:
                req.emit(piece, None)
        return False

    def _finish(self, row: _Row, reason: str, final: bool = True) -> None:
        req = row.request
        if final and row.text.final(req.tokens) and reason == "length":  # the whole text, decoded at once
            reason = "stop"  # a stop string completed by the last bytes, which incremental decoding held back
        req.text = row.text.text
        req.finish_reason = reason
        self.rows[row.slot] = None
        self.runner.release(row)
        if req.emit is not None:
            req.emit(row.text.rest(), reason)

    def fail_running(self, reason: str = "error") -> None:
        """End every running row with ``reason`` (after a failed step: their caches cannot be trusted)."""
        for row in self.rows:
            if row is not None:
                self._finish(row, reason)

    # -- loops ------------------------------------------------------------------------------------

    def run_forever(self, idle_wait: float = 0.05) -> None:
        """Step while there is work; sleep on the queue when there is none; return after ``shutdown()``
        once the running rows are done."""
        while True:
            if not self.running and self.waiting.empty():
                if self._stop.is_set():
                    return
                self._work.wait(idle_wait)  # set by submit()
                self._work.clear()
                continue
            self.step()

    def shutdown(self) -> None:
        """Stop taking steps once the running and waiting requests are done."""
        self._stop.set()

    def run_until_idle(self) -> None:
        """Step until every submitted request is done (the synchronous form of ``run_forever``)."""
        while self.step() or not self.waiting.empty():
            pass

    def _requests(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        seed: int | None,
        stop_strings: list[str] | None,
        min_new_tokens: int,
        stop_at_eos: bool,
        sampling: SamplingConfig,
    ) -> list[Request]:
        if not prompts:
            raise InvalidValue("prompts", [], 'give at least one ("" for an unconditional sample)')
        stops = tuple(s for s in (stop_strings or []) if s)
        requests = [
            Request(
                list(ids),
                max_new_tokens,
                sampling,
                min_tokens=min_new_tokens,
                stop=stops,
                seed=None if seed is None else [seed, i],
                stop_at_eos=stop_at_eos,
            )
            for i, ids in enumerate(prompts)
        ]
        for r in requests:  # all of them before any is queued (submit checks each again as it queues it)
            self.check(r.prompt_ids, r.max_tokens)
        return requests

    def generate(
        self,
        prompts: list[str],
        max_new_tokens: int = 64,
        *,
        sampling: SamplingConfig = SAMPLED,
        seed: int | None = None,
        stop_strings: list[str] | None = None,
        on_text: Callable[[str, str | None], None] | None = None,
        min_new_tokens: int = 0,
    ) -> list[str]:
        """The new text for each prompt (cut at EOS and before the first stop string), run to completion
        here. Row ``i`` draws from its own stream seeded ``(seed, i)``; ``on_text(piece, finish_reason)`` gets
        the first row's text as it grows (``Request.emit``: streaming a single sample)."""
        ids = [self.encode(p) for p in prompts]
        requests = self._requests(ids, max_new_tokens, seed, stop_strings, min_new_tokens, True, sampling)
        requests[0].emit = on_text
        for r in requests:
            self.submit(r)
        self.run_until_idle()
        return [r.text for r in requests]

    def generate_ids(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        *,
        sampling: SamplingConfig = SAMPLED,
        seed: int | None = None,
        min_new_tokens: int = 0,
        stop_at_eos: bool = True,
    ) -> np.ndarray:
        """The new token ids of each prompt (given as ids), [prompts, longest]: a row that ended at EOS has it
        last, then EOS padding. Seeded and sampled as ``generate``."""
        requests = self._requests(prompts, max_new_tokens, seed, None, min_new_tokens, stop_at_eos, sampling)
        for r in requests:
            self.submit(r)
        self.run_until_idle()
        rows = [r.tokens + ([self.eos] if r.finish_reason == "stop" else []) for r in requests]
        out = np.full((len(rows), max(map(len, rows))), self.eos, dtype=np.int64)
        for i, row in enumerate(rows):
            out[i, : len(row)] = row
        return out
