"""What `plait generate` and `plait serve` do, behind the CLI's argument parsing."""

from __future__ import annotations

import logging
from pathlib import Path

from plait.errors import ConfigError
from plait.serve.engine import Engine, EngineConfig
from plait.serve.params import SamplingParams
from plait.serve.text import Bytes

log = logging.getLogger(__name__)


def generate_text(path: str | Path, prompt: str, max_new_tokens: int, temperature: float,
                  top_k: int, seed: int, device: str = "cpu") -> str:
    """The prompt and its continuation, as `plait generate` prints them.

    The request runs through the serving engine as a batch of one, so it produces exactly the
    tokens the server produces for the same request, whatever else the server is running.
    A continuation longer than the model's context needs a sliding window, which a KV cache of
    learned positions cannot give: it is sampled by recomputing the window at every token.
    """
    if max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} must be ≥ 0")
    if temperature < 0:
        raise ConfigError(f"--temperature {temperature} must be ≥ 0 (0 = greedy)")
    if top_k < 0:
        raise ConfigError(f"--top-k {top_k} must be ≥ 0 (0 = no top-k filtering)")
    engine = Engine.from_path(path, EngineConfig(max_seqs=1), device=device)
    prompt = prompt or "\n"
    ids = engine.encode(prompt)
    if max_new_tokens == 0:
        return prompt
    if len(ids) + max_new_tokens <= engine.context:
        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
        return prompt + engine.generate([ids], params)[0].text
    if not isinstance(engine.tokenizer, Bytes):
        raise ConfigError(f"prompt ({len(ids)} tokens) + --max-new-tokens {max_new_tokens} exceeds the "
                          f"model's context of {engine.context} tokens")
    from plait.generate import sample

    log.info("%d + %d tokens exceed the context of %d: sampling with a sliding window, no KV cache",
             len(ids), max_new_tokens, engine.context)
    return sample(engine.model, prompt, max_new_tokens, temperature, top_k or None, seed, device=device)


def engine_config(max_seqs: int, prefill_chunk: int, max_step_tokens: int, max_queue: int) -> EngineConfig:
    cfg = EngineConfig(max_seqs=max_seqs, prefill_chunk=prefill_chunk, max_step_tokens=max_step_tokens,
                       max_queue=max_queue)
    cfg.check()
    return cfg
