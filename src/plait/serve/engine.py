"""The serving engine: continuous batching over a KV cache, usable in-process.

    from plait.serve import Engine, SamplingParams

    engine = Engine.from_path("runs/tiny_gpt")
    for c in engine.generate(["The list ", "A tuple "], SamplingParams(max_tokens=40, temperature=0)):
        print(c.text)

`add_request` / `step` / `abort` are the lower-level loop that the HTTP server drives from its
own thread; the engine itself is not thread-safe.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence as Seq

import torch

from plait.errors import ConfigError, RequestError, ServerBusyError
from plait.models.gpt import GPT
from plait.serve.invariance import probe_row_quantum, probe_span_quantum
from plait.serve.kv_cache import KVCache
from plait.serve.params import SamplingParams
from plait.serve.quantize.linear import check_scheme
from plait.serve.quantize.runtime import (bind_quantized_layers, ensure_quantized, has_quantized_layers,
                                          probe_quantized_row_quantum)
from plait.serve.runner import Chunk, ModelRunner, StepInput, StepRunner
from plait.serve.sampling import new_generator, sample_next
from plait.serve.scheduler import Plan, Scheduler
from plait.serve.sequence import Sequence
from plait.serve.text import Bytes, TextStream, Tokenizer

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    """Capacity of the engine.

    max_seqs: sequences decoding at once (each holds a full-context KV-cache slot);
    prefill_chunk: prompt tokens per sequence per step; max_step_tokens: tokens per step in all
    (0 = max_seqs + 2 × prefill_chunk); max_queue: requests waiting for a slot before new ones
    are refused; row_quantum: rows per padded matrix product, span_quantum: attention spans are
    multiples of it (0 = probe this machine at start for both; see `plait.serve.invariance`);
    quantize: None, or "int8" | "int4" | "bf16" to serve a float model with reduced-bit linear
    layers (swapped in place at start; see `plait.serve.quantize`).
    """

    max_seqs: int = 32
    prefill_chunk: int = 64
    max_step_tokens: int = 0
    max_queue: int = 256
    row_quantum: int = 0
    span_quantum: int = 0
    quantize: str | None = None

    def check(self) -> None:
        for name in ("max_seqs", "prefill_chunk", "max_queue"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be ≥ 1")
        if self.max_step_tokens < 0:
            raise ConfigError(f"max_step_tokens={self.max_step_tokens} must be ≥ 0 (0 = automatic)")
        for name in ("row_quantum", "span_quantum"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be ≥ 0 (0 = probe at start)")
        if self.quantize is not None:
            check_scheme(self.quantize, "quantize")

    @property
    def step_tokens(self) -> int:
        return self.max_step_tokens or self.max_seqs + 2 * self.prefill_chunk


class PromptChecker:
    """A model's side of request checking: text to token ids, ids within its vocabulary. Shared
    by the engine and by an HTTP server whose engine runs in another process."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, context: int):
        self.tokenizer, self.vocab_size, self.context = tokenizer, vocab_size, context

    def encode(self, prompt: str | Seq[int]) -> list[int]:
        """Token ids of a prompt given as text or as ids (checked against the vocabulary)."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        ids = list(prompt)
        if not self._in_vocabulary(ids):
            raise RequestError(f"prompt token ids must be integers in [0, {self.vocab_size})", "prompt")
        return ids

    def check_resume(self, resume: Seq[int], params: SamplingParams) -> list[int]:
        """`resume` as a list, or RequestError: token ids in the vocabulary, fewer than max_tokens,
        no end token (a stream that ended is not resumed)."""
        ids = list(resume)
        if not self._in_vocabulary(ids):
            raise RequestError(f"plait.resume token ids must be integers in [0, {self.vocab_size})", "plait")
        if len(ids) >= params.max_tokens:
            raise RequestError(f"plait.resume holds {len(ids)} tokens; a request to resume has fewer "
                               f"than max_tokens={params.max_tokens}", "plait")
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id in ids:
            raise RequestError("plait.resume holds the end token: that stream is finished", "plait")
        return ids

    def _in_vocabulary(self, ids: list[int]) -> bool:
        return all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.vocab_size for t in ids)


@dataclass
class RequestOutput:
    """What one step produced for one request: new tokens and the new final text."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Completion:
    """A whole request's result (from :meth:`Engine.generate`)."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class Engine:
    """Serves a plain :class:`GPT`: many requests at once, each as if it ran alone."""

    def __init__(self, model: GPT, tokenizer: Tokenizer | None = None, config: EngineConfig | None = None,
                 name: str = "plait", *, runner: StepRunner | None = None):
        """`runner`, when given, runs the steps instead of a :class:`ModelRunner` over `model` (and
        brings its own KV cache): how a model split over processes plugs in (see
        :mod:`plait.serve.model_parallel`); `model` then only names the shape (cfg, dtype, device)."""
        self.config = config or EngineConfig()
        self.config.check()
        if runner is None:
            model = ensure_quantized(model, self.config.quantize)
        elif self.config.quantize:
            raise ConfigError(f"quantize={self.config.quantize!r} is applied by the in-process runner only; a "
                              "model split over processes is served with float weights")
        self.model = model.eval()
        self.tokenizer = tokenizer or Bytes()
        self.name = name
        c = model.cfg
        self.context = c.block_size
        self.vocab_size = c.vocab_size
        self.prompts = PromptChecker(self.tokenizer, self.vocab_size, self.context)
        p = next(model.parameters())
        self.device = p.device
        if runner is None:
            cache = KVCache(c.n_layer, self.config.max_seqs, c.n_head, c.block_size, c.n_embd // c.n_head,
                            dtype=p.dtype, device=p.device)
            quantum = self.config.row_quantum or probe_row_quantum(model, self.config.step_tokens)
            quantized = has_quantized_layers(model)
            if quantized and not self.config.row_quantum:
                quantum = max(quantum, probe_quantized_row_quantum(model, self.config.step_tokens))
            spans = self.config.span_quantum or probe_span_quantum(c.n_head, c.n_embd // c.n_head, c.block_size,
                                                                   p.dtype, p.device)
            runner = ModelRunner(model, cache, quantum, spans)
            if quantized:
                bind_quantized_layers(runner)
        self.runner = runner
        self.cache = runner.cache
        quantum, spans = runner.quantum, runner.span_quantum
        self.scheduler = Scheduler(self.cache, self.config.step_tokens, self.config.prefill_chunk)
        self._seqs: dict[str, Sequence] = {}
        self._replay: dict[str, list[int]] = {}  # request id → tokens to replay (see add_request)
        self._counter = itertools.count()
        log.info("engine: %d slots × %d positions (KV cache %.1f MB), %d tokens per step, row quantum %d, "
                 "span quantum %d", self.config.max_seqs, c.block_size, self.cache.nbytes / 1e6,
                 self.config.step_tokens, quantum, spans)

    @classmethod
    def from_path(cls, path: str | Path, config: EngineConfig | None = None, device: str = "cpu",
                  name: str | None = None) -> "Engine":
        """An engine for a run folder, a checkpoint folder or a GPT-2 folder (see `load_for_serving`)."""
        from plait.serve.loader import load_for_serving

        model, tok, default_name = load_for_serving(path, device)
        return cls(model, tok, config, name or default_name)

    def close(self) -> None:
        """Release what the runner holds beyond this process (a model-parallel group's worker
        processes); nothing to do for an in-process engine. The engine is unusable afterwards."""
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()

    # --- requests -----------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def encode(self, prompt: str | Seq[int]) -> list[int]:
        """Token ids of a prompt given as text or as ids (checked against the vocabulary)."""
        return self.prompts.encode(prompt)

    def in_flight(self) -> list[str]:
        """The ids of the requests queued or running."""
        return list(self._seqs)

    def add_request(self, prompt: str | Seq[int], params: SamplingParams | None = None,
                    request_id: str | None = None, resume: Seq[int] = ()) -> str:
        """Queue a request; returns its id. Raises RequestError (bad input) or ServerBusyError
        (queue full).

        `resume`: tokens this request already produced elsewhere (a stream that moves from a
        replica that died). They are replayed rather than sampled, one per step through the same
        decode path, and each still takes its random draw, so the tokens that follow are those an
        undisturbed run gives, greedy or seeded; their text is not sent again.
        """
        params = params or SamplingParams()
        ids = self.encode(prompt)
        params.check(len(ids), self.context)
        resume = self.check_resume(resume, params)
        if self.num_waiting >= self.config.max_queue:
            raise ServerBusyError(f"{self.num_waiting} requests are waiting (max_queue="
                                  f"{self.config.max_queue}); retry later")
        rid = request_id or f"req-{next(self._counter)}-{uuid.uuid4().hex[:8]}"
        if rid in self._seqs:
            raise RequestError(f"request id {rid!r} is already in use", "request_id")
        seq = Sequence(rid, ids, params, None if params.greedy else new_generator(params.seed, self.device),
                       TextStream(self.tokenizer.decoder(), params.stop))
        self._seqs[rid] = seq
        if resume:
            self._replay[rid] = resume
        self.scheduler.add(seq)
        return rid

    def check_resume(self, resume: Seq[int], params: SamplingParams) -> list[int]:
        """`resume` as a list, or RequestError (see :meth:`PromptChecker.check_resume`)."""
        return self.prompts.check_resume(resume, params)

    def abort(self, request_id: str) -> bool:
        """Cancel a request (queued or running) and free its slot; False if it is not in flight."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        self._replay.pop(request_id, None)
        self.scheduler.finish(seq)
        seq.finish_reason = "abort"
        return True

    # --- the loop -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one iteration: every decoding sequence gains a token, prompts advance a chunk."""
        plan = self.scheduler.schedule()
        if not plan:
            return []
        logits = self.runner.forward(self._step_input(plan))
        self._mark_computed(plan)
        return self._outputs(self._ready(plan), logits)

    # The parts of a step, also used by engines that keep several steps in flight
    # (plait.serve.model_parallel.cohorts).

    @staticmethod
    def _step_input(plan: Plan) -> StepInput:
        """The runner's input for `plan` (sorts its decoders by slot)."""
        inp = StepInput()
        plan.decode.sort(key=lambda s: s.slot)  # slots 0..n-1 in order: attention needs no scatter
        for seq in plan.decode:
            inp.decode_slots.append(seq.slot)
            inp.decode_tokens.append(seq.output_ids[-1])
            inp.decode_positions.append(seq.prompt_len + len(seq.output_ids) - 1)
        for seq, start, end in plan.prefill:
            inp.chunks.append(Chunk(seq.slot, start, seq.prompt_ids[start:end], end == seq.prompt_len))
        return inp

    @staticmethod
    def _mark_computed(plan: Plan) -> None:
        for seq in plan.decode:
            seq.computed += 1
        for seq, _, end in plan.prefill:
            seq.computed = end

    @staticmethod
    def _ready(plan: Plan) -> list[Sequence]:
        """The sequences whose logits `plan`'s step returns, in the order of its logits rows."""
        return plan.decode + [seq for seq, _, end in plan.prefill if end == seq.prompt_len]

    def _outputs(self, ready: list[Sequence], logits: torch.Tensor) -> list[RequestOutput]:
        """Sample each of `ready`'s next token from its row of `logits` and append it."""
        tokens = sample_next(logits, [s.params for s in ready], [s.generator for s in ready])
        if not self._replay:
            return [self._append(seq, tok) for seq, tok in zip(ready, tokens)]
        outputs = []
        for seq, tok in zip(ready, tokens):
            replay = self._replay.get(seq.request_id)
            if replay is None:
                outputs.append(self._append(seq, tok))
                continue
            # A resumed request: the token its first run sent replaces the one just drawn (the
            # draw still kept its generator in step).
            tok = replay[len(seq.output_ids)]
            if len(seq.output_ids) + 1 == len(replay):
                del self._replay[seq.request_id]
            out = self._append(seq, tok, replayed=True)
            if out.finished:
                outputs.append(out)
        return outputs

    def _append(self, seq: Sequence, token: int, replayed: bool = False) -> RequestOutput:
        now = time.perf_counter()
        seq.output_ids.append(token)
        if seq.first_token_time is None and not replayed:
            seq.first_token_time = now
        text, stopped = seq.text.push(token)
        if replayed:  # its text was sent by the run that produced it
            text = ""
        reason = None
        if stopped or (token == self.tokenizer.eos_token_id):
            reason = "stop"
        elif len(seq.output_ids) >= seq.params.max_tokens:
            reason = "length"
        if reason is not None:
            text += seq.text.flush()
            seq.finish_reason, seq.finish_time = reason, now
            self.scheduler.finish(seq)
            del self._seqs[seq.request_id]
            self._replay.pop(seq.request_id, None)
        return RequestOutput(seq.request_id, text, [token], reason is not None, reason,
                             seq.prompt_len, len(seq.output_ids))

    # --- offline ------------------------------------------------------------------------------

    def generate(self, prompts: str | Seq[str | Seq[int]],
                 params: SamplingParams | Seq[SamplingParams] | None = None) -> list[Completion]:
        """Complete every prompt (batched continuously); results in the order of `prompts`.

        Every request is checked before any runs. Meant for offline use of an otherwise idle
        engine: outputs of requests added elsewhere are consumed and dropped.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        params = list(params)
        if len(params) != len(prompts):
            raise RequestError(f"{len(params)} sampling params for {len(prompts)} prompts", "params")
        encoded = [self.encode(p) for p in prompts]
        for ids, sp in zip(encoded, params):
            sp.check(len(ids), self.context)
        todo = list(range(len(prompts)))[::-1]
        index: dict[str, int] = {}
        texts: dict[int, list[str]] = {}
        tokens: dict[int, list[int]] = {}
        done: dict[int, Completion] = {}
        while todo or self.has_unfinished():
            while todo and self.num_waiting < self.config.max_queue:
                i = todo.pop()
                index[self.add_request(encoded[i], params[i])] = i
                texts[i], tokens[i] = [], []
            for out in self.step():
                i = index.get(out.request_id)
                if i is None:
                    continue
                texts[i].append(out.text)
                tokens[i] += out.token_ids
                if out.finished:
                    done[i] = Completion(out.request_id, "".join(texts[i]), tokens[i], out.finish_reason,
                                         out.prompt_tokens, out.completion_tokens)
        return [done[i] for i in range(len(prompts))]
