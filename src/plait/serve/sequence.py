"""A request's state inside the engine, from queued to finished."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from plait.serve.params import SamplingParams
from plait.serve.text import TextStream


class Status(enum.Enum):
    WAITING = "waiting"  # queued, holds no cache slot
    RUNNING = "running"  # holds a slot: prefilling its prompt, then decoding
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    text: TextStream
    arrival: float = field(default_factory=time.perf_counter)
    status: Status = Status.WAITING
    slot: int | None = None
    computed: int = 0  # tokens whose keys and values are in the cache
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "length", "stop" or "abort"
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def prefilling(self) -> bool:
        return self.computed < self.prompt_len
