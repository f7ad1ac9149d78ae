"""Serving: a continuous-batching engine with a KV cache, and an OpenAI-compatible HTTP API.

`Engine` runs in-process (a list of prompts in, completions out); `plait serve` puts the same
engine behind FastAPI + uvicorn (see :mod:`plait.serve.api`).
"""

from plait.serve.engine import Completion, Engine, EngineConfig, RequestOutput
from plait.serve.params import SamplingParams

__all__ = ["Completion", "Engine", "EngineConfig", "RequestOutput", "SamplingParams"]
