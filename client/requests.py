"""Building the GenerateRequest message from the SDK's keyword arguments.

`build_request` is the one place that knows the generation parameters, their defaults and the
client-side checks; `Client` and `AsyncClient` pass their `**params` straight through to it.
Everything else (ranges, lengths, vocabulary) is validated by the router, whose INVALID_ARGUMENT
message names the field and the limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

from shardline.proto import serving_pb2 as pb


class GenerateParams(TypedDict, total=False):
    """The keyword arguments of `generate` / `generate_stream` besides `prompt` and `timeout`."""

    prompt_token_ids: Sequence[int] | None
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    seed: int | None
    stop: str | Sequence[str] | None
    ignore_eos: bool
    logprobs: bool
    priority: int


def build_request(
    prompt: str | None = None,
    *,
    prompt_token_ids: Sequence[int] | None = None,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    ignore_eos: bool = False,
    logprobs: bool = False,
    priority: int = 0,
) -> pb.GenerateRequest:
    """The GenerateRequest for these arguments.

    prompt / prompt_token_ids: the prompt as text or as token ids; exactly one is required.
    max_new_tokens: most tokens to generate. temperature: 0 means greedy. top_k: 0 disables.
    top_p: nucleus mass in (0, 1]. repetition_penalty: > 1 discourages repeats. seed: same seed,
    same text (None lets the router pick). stop: a string or strings that end the output (excluded).
    ignore_eos: keep going past end-of-sequence. logprobs: return each token's log-probability.
    priority: higher is served first.
    Raises ValueError when both or neither prompt form is given or an unsigned field is negative,
    TypeError for a prompt that is not a str.
    """
    for name, value in (("max_new_tokens", max_new_tokens), ("top_k", top_k), ("seed", seed)):
        if value is not None and value < 0:  # unsigned on the wire: the router could not even see it
            raise ValueError(f"{name} must be >= 0, got {value}")
    parameters = pb.Parameters(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        stop=[stop] if isinstance(stop, str) else list(stop or ()),  # one string is one sequence
        ignore_eos=ignore_eos,
        logprobs=logprobs,
    )
    if seed is not None:
        parameters.seed = seed
    request = pb.GenerateRequest(parameters=parameters, priority=priority)
    _set_prompt(request, prompt, prompt_token_ids)
    return request


def _set_prompt(request: pb.GenerateRequest, prompt: str | None, token_ids: Sequence[int] | None) -> None:
    """Fill the request's `input` oneof; exactly one of `prompt` and `token_ids` may be given."""
    if (prompt is None) == (token_ids is None):
        raise ValueError("exactly one of prompt and prompt_token_ids is required, "
                         f"got {'both' if prompt is not None else 'neither'}")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}; "
                            "pass token ids as prompt_token_ids=")
        request.prompt = prompt
    else:
        request.prompt_token_ids.ids.extend(token_ids)  # type: ignore[arg-type]
        request.prompt_token_ids.SetInParent()  # an empty id list still selects the oneof

