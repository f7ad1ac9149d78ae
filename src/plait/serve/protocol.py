"""The OpenAI completions request as plait reads it: types checked strictly, unsupported options
refused by name rather than silently ignored."""

from __future__ import annotations

from typing import Any, Union

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from plait.errors import RequestError
from plait.serve.params import SamplingParams

Number = Union[StrictInt, StrictFloat]

# Options of the OpenAI API that plait accepts only at their neutral value.
_NEUTRAL = {"n": (1,), "best_of": (None, 1), "echo": (None, False), "logprobs": (None,),
            "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}),
            "suffix": (None, "")}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class PlaitOptions(BaseModel):
    """plait's own request extension, under "plait" (OpenAI clients never send it): what the
    router uses to move a stream to another replica without a visible seam.

    token_ids: each streamed choice (and each whole choice) also carries
    `"plait": {"token_ids": [...], "prompt_tokens": n}`, one event per generated token.
    resume: per prompt, the token ids already sent to the client by an earlier run of this
    request; generation continues after them, as that run would have (see `Engine.add_request`).
    """

    model_config = ConfigDict(extra="forbid")
    token_ids: StrictBool = False
    resume: list[list[StrictInt]] | None = None


class CompletionRequest(BaseModel):
    """POST /v1/completions. Unknown fields (e.g. `user`) are ignored, as OpenAI's server does."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]
    max_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None  # beyond OpenAI's fields, as vLLM offers it
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    n: StrictInt | None = 1
    best_of: StrictInt | None = None
    echo: StrictBool | None = None
    logprobs: StrictInt | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Any] | None = None
    suffix: StrictStr | None = None
    plait: PlaitOptions | None = None

    @classmethod
    def parse(cls, body: Any) -> "CompletionRequest":
        """Validate a decoded JSON body; RequestError names the first field at fault."""
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        try:
            req = cls.model_validate(body)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = str(err["loc"][0]) if err.get("loc") else None
            expected = {"prompt": "a string, a list of strings, a list of token ids or a list of "
                                  "lists of token ids"}.get(field, err["msg"].lower())
            raise RequestError(f"{field}: {expected} (got {body.get(field)!r})"
                               if field in body else f"{field}: field required", field) from None
        if req.n is None:
            req.n = 1
        for name, neutral in _NEUTRAL.items():
            value = getattr(req, name)
            if value not in neutral:
                raise RequestError(f"{name}={value!r} is not supported by this server; valid: "
                                   f"{' or '.join(repr(v) for v in neutral if v is not None) or 'null'}", name)
        return req

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise RequestError("prompt is an empty list; send at least one prompt", "prompt")
        if all(isinstance(t, int) for t in p):
            return [list(p)]
        return list(p)

    def sampling_params(self) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=16 if self.max_tokens is None else self.max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            stop=stop,
            seed=self.seed,
        )

    def resume_ids(self, prompts: int) -> list[list[int]]:
        """Per prompt, the tokens to resume after (empty lists without `plait.resume`)."""
        resume = self.plait.resume if self.plait is not None else None
        if resume is None:
            return [[] for _ in range(prompts)]
        if len(resume) != prompts:
            raise RequestError(f"plait.resume has {len(resume)} lists for {prompts} prompts; send one "
                               "per prompt", "plait")
        return [list(r) for r in resume]

    @property
    def token_ids(self) -> bool:
        return bool(self.plait is not None and self.plait.token_ids)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)
