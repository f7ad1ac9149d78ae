"""What `plait generate` and `plait serve` do, behind the CLI's argument parsing."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from plait.errors import ConfigError
from plait.serve.engine import Engine, EngineConfig
from plait.serve.params import SamplingParams
from plait.serve.text import Bytes

if TYPE_CHECKING:
    from plait.serve.router.config import AutoscalingConfig

log = logging.getLogger(__name__)


def generate_text(path: str | Path, prompt: str, max_new_tokens: int, temperature: float,
                  top_k: int, seed: int, device: str = "cpu", quantize: str | None = None) -> str:
    """The prompt and its continuation, as `plait generate` prints them.

    `quantize` ("int8", "int4", "bf16"): sample from the model with reduced-bit linear layers.

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
    engine = Engine.from_path(path, EngineConfig(max_seqs=1, quantize=quantize), device=device)
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


def engine_config(max_seqs: int, prefill_chunk: int, max_step_tokens: int, max_queue: int,
                  quantize: str | None = None) -> EngineConfig:
    kw = {}
    if quantize is not None:
        if "quantize" not in {f.name for f in dataclasses.fields(EngineConfig)}:
            raise ConfigError(f"--quantize {quantize}: this build of plait's engine has no reduced-bit weights")
        kw["quantize"] = quantize
    cfg = EngineConfig(max_seqs=max_seqs, prefill_chunk=prefill_chunk, max_step_tokens=max_step_tokens,
                       max_queue=max_queue, **kw)
    cfg.check()
    return cfg


AUTOSCALING_FLAGS = ("min_replicas", "max_replicas", "target_ongoing_requests", "upscale_delay_s",
                     "downscale_delay_s")


def serve_mode(args: argparse.Namespace) -> tuple[str, AutoscalingConfig | None]:
    """How `plait serve` runs for these flags, checked before anything starts: ("ray" | "router" |
    "model_parallel" | "local", the autoscaling config or None)."""
    from plait.serve.router.config import AutoscalingConfig, RouterConfig

    given = {k: getattr(args, k) for k in AUTOSCALING_FLAGS if getattr(args, k, None) is not None}
    for name in ("tp", "pp"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} {getattr(args, name)} must be ≥ 1")
    scaling = None
    if given:
        if args.replicas is not None:
            raise ConfigError("--replicas fixes the replica count; with autoscaling give --min-replicas and "
                              "--max-replicas instead")
        scaling = AutoscalingConfig(**given)
        scaling.check()
    replicas = 1 if args.replicas is None else args.replicas
    RouterConfig(replicas=replicas, autoscaling=scaling).check()
    if args.backend == "ray":
        if scaling is None and replicas > 1:  # a fixed count, in Ray Serve's terms
            scaling = AutoscalingConfig(min_replicas=replicas, max_replicas=replicas)
        return "ray", scaling
    if scaling is not None or replicas > 1:
        return "router", scaling
    return ("model_parallel" if args.tp * args.pp > 1 else "local"), None


def replica_args(args: argparse.Namespace) -> list[str]:
    """The `plait serve` options each replica of a router gets: the engine's, passed through."""
    out = ["--max-seqs", str(args.max_seqs), "--prefill-chunk", str(args.prefill_chunk),
           "--max-step-tokens", str(args.max_step_tokens), "--max-queue", str(args.max_queue),
           "--device", args.device, "--tp", str(args.tp), "--pp", str(args.pp)]
    if args.model_name:
        out += ["--model-name", args.model_name]
    if args.quantize:
        out += ["--quantize", args.quantize]
    if getattr(args, "verbose", False):
        out.append("-v")
    return out


def run_serve(args: argparse.Namespace, announce: Callable[[str], None]) -> int:
    """`plait serve`: one engine in this process, replicas behind a router, or Ray Serve."""
    import os

    mode, scaling = serve_mode(args)
    cfg = engine_config(args.max_seqs, args.prefill_chunk, args.max_step_tokens, args.max_queue, args.quantize)
    api_key = args.api_key or os.environ.get("PLAIT_API_KEY") or None
    log_level = "info" if getattr(args, "verbose", False) else "warning"
    if mode == "ray":
        from plait.serve.ray_backend import serve_ray

        serve_ray(args.path, host=args.host, port=args.port, api_key=api_key, config=cfg,
                  autoscaling=dataclasses.asdict(scaling) if scaling is not None else None, device=args.device,
                  model_name=args.model_name)
        return 0
    if mode == "router":
        from plait.serve.router import RouterConfig, serve_replicas

        if not str(args.path).startswith("hf:") and not Path(args.path).exists():
            raise ConfigError(f"{args.path}: no such run, checkpoint or Hugging Face folder to serve")

        config = RouterConfig(replicas=args.replicas or 1, autoscaling=scaling)
        # Scale events are part of what a router reports, at its default log level too.
        logging.getLogger("plait.serve.router").setLevel(logging.INFO)

        def routing(url: str, models: dict | None) -> None:
            count = (f"{config.replicas} replicas" if scaling is None else
                     f"{scaling.min_replicas}-{scaling.max_replicas} replicas (autoscaling)")
            what = (f"{models['data'][0]['id']} ({models['data'][0]['max_model_len']}-token context)"
                    if models else str(args.path))
            announce(f"serving {what} from {count} on {url}  (OpenAI API at {url}/v1)")

        serve_replicas(args.path, replica_args(args), config, args.host, args.port, api_key,
                       on_ready=routing, log_level=log_level)
        return 0

    def ready(url: str, engine: Engine) -> None:
        announce(f"serving {engine.name} ({engine.context}-token context) on {url}  (OpenAI API at {url}/v1)")

    if mode == "model_parallel":
        from plait.serve.model_parallel import open_engine
        from plait.serve.server import serve_engine

        engine = open_engine(args.path, cfg, tp=args.tp, pp=args.pp, device=args.device, name=args.model_name)
        try:
            serve_engine(engine, args.host, args.port, api_key, on_ready=ready, log_level=log_level)
        finally:
            close = getattr(engine, "close", None)
            if close is not None:
                close()
        return 0
    from plait.serve.server import serve

    serve(args.path, args.host, args.port, api_key, cfg, args.device, args.model_name, on_ready=ready,
          log_level=log_level)
    return 0
