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

from plait.errors import ConfigError, RequestError, ServerBusyError
from plait.models.gpt import GPT
from plait.serve.invariance import probe_row_quantum, probe_span_quantum
from plait.serve.kv_cache import KVCache
from plait.serve.params import SamplingParams
from plait.serve.runner import Chunk, ModelRunner, StepInput
from plait.serve.sampling import new_generator, sample_next
from plait.serve.scheduler import Scheduler
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
    multiples of it (0 = probe this machine at start for both; see `plait.serve.invariance`).
    """

    max_seqs: int = 32
    prefill_chunk: int = 64
    max_step_tokens: int = 0
    max_queue: int = 256
    row_quantum: int = 0
    span_quantum: int = 0

    def check(self) -> None:
        for name in ("max_seqs", "prefill_chunk", "max_queue"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be ≥ 1")
        if self.max_step_tokens < 0:
            raise ConfigError(f"max_step_tokens={self.max_step_tokens} must be ≥ 0 (0 = automatic)")
        for name in ("row_quantum", "span_quantum"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be ≥ 0 (0 = probe at start)")

    @property
    def step_tokens(self) -> int:
        return self.max_step_tokens or self.max_seqs + 2 * self.prefill_chunk


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
                 name: str = "plait"):
        self.config = config or EngineConfig()
        self.config.check()
        self.model = model.eval()
        self.tokenizer = tokenizer or Bytes()
        self.name = name
        c = model.cfg
        self.context = c.block_size
        self.vocab_size = c.vocab_size
        p = next(model.parameters())
        self.device = p.device
        self.cache = KVCache(c.n_layer, self.config.max_seqs, c.n_head, c.block_size, c.n_embd // c.n_head,
                             dtype=p.dtype, device=p.device)
        self.scheduler = Scheduler(self.cache, self.config.step_tokens, self.config.prefill_chunk)
        quantum = self.config.row_quantum or probe_row_quantum(model, self.config.step_tokens)
        spans = self.config.span_quantum or probe_span_quantum(c.n_head, c.n_embd // c.n_head, c.block_size,
                                                               p.dtype, p.device)
        self.runner = ModelRunner(model, self.cache, quantum, spans)
        self._seqs: dict[str, Sequence] = {}
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
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        ids = list(prompt)
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.vocab_size for t in ids):
            raise RequestError(f"prompt token ids must be integers in [0, {self.vocab_size})", "prompt")
        return ids

    def add_request(self, prompt: str | Seq[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request; returns its id. Raises RequestError (bad input) or ServerBusyError
        (queue full)."""
        params = params or SamplingParams()
        ids = self.encode(prompt)
        params.check(len(ids), self.context)
        if self.num_waiting >= self.config.max_queue:
            raise ServerBusyError(f"{self.num_waiting} requests are waiting (max_queue="
                                  f"{self.config.max_queue}); retry later")
        rid = request_id or f"req-{next(self._counter)}-{uuid.uuid4().hex[:8]}"
        if rid in self._seqs:
            raise RequestError(f"request id {rid!r} is already in use", "request_id")
        seq = Sequence(rid, ids, params, None if params.greedy else new_generator(params.seed, self.device),
                       TextStream(self.tokenizer.decoder(), params.stop))
        self._seqs[rid] = seq
        self.scheduler.add(seq)
        return rid

    def abort(self, request_id: str) -> bool:
        """Cancel a request (queued or running) and free its slot; False if it is not in flight."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq)
        seq.finish_reason = "abort"
        return True

    # --- the loop -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one iteration: every decoding sequence gains a token, prompts advance a chunk."""
        plan = self.scheduler.schedule()
        if not plan:
            return []
        inp = StepInput()
        plan.decode.sort(key=lambda s: s.slot)  # slots 0..n-1 in order: attention needs no scatter
        for seq in plan.decode:
            inp.decode_slots.append(seq.slot)
            inp.decode_tokens.append(seq.output_ids[-1])
            inp.decode_positions.append(seq.prompt_len + len(seq.output_ids) - 1)
        for seq, start, end in plan.prefill:
            inp.chunks.append(Chunk(seq.slot, start, seq.prompt_ids[start:end], end == seq.prompt_len))
        logits = self.runner.forward(inp)
        for seq in plan.decode:
            seq.computed += 1
        for seq, _, end in plan.prefill:
            seq.computed = end
        ready = plan.decode + [seq for seq, _, end in plan.prefill if end == seq.prompt_len]
        tokens = sample_next(logits, [s.params for s in ready], [s.generator for s in ready])
        return [self._append(seq, tok) for seq, tok in zip(ready, tokens)]

    def _append(self, seq: Sequence, token: int) -> RequestOutput:
        now = time.perf_counter()
        seq.output_ids.append(token)
        if seq.first_token_time is None:
            seq.first_token_time = now
        text, stopped = seq.text.push(token)
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
