"""Per-request sampling settings, and the checks every request passes before it is queued."""

from __future__ import annotations

from dataclasses import dataclass, field

from plait.errors import RequestError

MAX_STOP_STRINGS = 4  # as the OpenAI API


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded.

    temperature 0 is greedy (argmax); otherwise logits are divided by it, filtered by `top_k`
    (0 = off) and `top_p` (nucleus, 1 = off), and a token is drawn with the request's own
    generator, seeded by `seed` (None = a fresh random seed). Generation ends after `max_tokens`
    tokens, or at the first `stop` string (the text returned stops before it).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def check(self, prompt_tokens: int, context: int) -> None:
        """Raise :class:`RequestError` naming the field when this request cannot run on a model
        with `context` positions."""
        def number(name: str, value: object, kind: type | tuple[type, ...]) -> None:
            if isinstance(value, bool) or not isinstance(value, kind):
                raise RequestError(f"{name} must be a number, got {value!r}", name)

        number("max_tokens", self.max_tokens, int)
        number("temperature", self.temperature, (int, float))
        number("top_k", self.top_k, int)
        number("top_p", self.top_p, (int, float))
        if self.seed is not None:
            number("seed", self.seed, int)
        if self.max_tokens <= 0:
            raise RequestError(f"max_tokens={self.max_tokens} must be ≥ 1", "max_tokens")
        if not self.temperature >= 0:  # also refuses NaN
            raise RequestError(f"temperature={self.temperature} must be ≥ 0 (0 = greedy)", "temperature")
        if self.top_k < 0:
            raise RequestError(f"top_k={self.top_k} must be ≥ 0 (0 = no top-k filtering)", "top_k")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p={self.top_p} must be in (0, 1]", "top_p")
        if len(self.stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in self.stop):
            raise RequestError(f"stop must be at most {MAX_STOP_STRINGS} non-empty strings, got "
                               f"{list(self.stop)!r}", "stop")
        if prompt_tokens < 1:
            raise RequestError("prompt is empty; send at least one token of text", "prompt")
        if prompt_tokens + self.max_tokens > context:
            raise RequestError(
                f"prompt ({prompt_tokens} tokens) + max_tokens ({self.max_tokens}) = "
                f"{prompt_tokens + self.max_tokens} exceeds the model's context of {context} tokens; "
                "shorten the prompt or lower max_tokens", "max_tokens")
