"""What the SDK sends: the GenerateRequest built from keyword arguments, and the channel's limits.

`build_request` is the one place that knows the generation parameters and the client-side checks;
`Client` and `AsyncClient` pass their `**params` straight through to it. A parameter left unset
(None) is not sent, so the router's defaults apply (`--default-max-new-tokens`, temperature 1, ...).
The client refuses only what the wire cannot carry (a negative count, a seed past 64 bits) and
what needs no server to know (both or neither prompt form), with `InvalidRequestError` worded as
the router words it; everything else (ranges, lengths, vocabulary) is validated by the router.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict, Union

from shardline.client.errors import invalid
from shardline.common.tool_calls import BadField, ToolPlan
from shardline.proto import serving_pb2 as pb

# Largest message either way on the SDK's channels (gRPC's default receive limit is 4 MiB, which a
# long completion with logprobs can pass); the router's own limit decides what it accepts.
MESSAGE_LIMIT = 128 << 20
UINT32, UINT64, INT32 = 2**32 - 1, 2**64 - 1, 2**31 - 1

ChatMessage = Union[Mapping[str, str], tuple[str, str]]
"""One chat turn: {"role": "user", "content": "Hi"} (OpenAI's shape) or ("user", "Hi")."""


class GenerateParams(TypedDict, total=False):
    """The keyword arguments of `generate` / `generate_stream` besides `prompt` and `timeout`."""

    prompt_token_ids: Sequence[int] | None
    messages: Sequence[ChatMessage] | None
    max_new_tokens: int | None
    temperature: float | None
    top_k: int | None
    top_p: float | None
    repetition_penalty: float | None
    seed: int | None
    stop: str | Sequence[str] | None
    ignore_eos: bool
    logprobs: bool
    top_logprobs: int | None
    priority: int
    speculative: bool
    json_schema: Mapping[str, Any] | str | None
    json_object: bool
    regex: str | None
    choice: Sequence[str] | None
    grammar: str | None
    tools: Sequence[Mapping[str, Any]] | None
    tool_choice: str | Mapping[str, Any] | None
    parallel_tool_calls: bool


def channel_options(options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The SDK's message size limits, then the caller's options (which override them)."""
    given = {name for name, _ in options}
    defaults = [("grpc.max_send_message_length", MESSAGE_LIMIT), ("grpc.max_receive_message_length", MESSAGE_LIMIT)]
    return [option for option in defaults if option[0] not in given] + list(options)


def build_request(
    prompt: str | None = None,
    *,
    prompt_token_ids: Sequence[int] | None = None,
    messages: Sequence[ChatMessage] | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    ignore_eos: bool = False,
    logprobs: bool = False,
    top_logprobs: int | None = None,
    priority: int = 0,
    speculative: bool = True,
    json_schema: Mapping[str, Any] | str | None = None,
    json_object: bool = False,
    regex: str | None = None,
    choice: Sequence[str] | None = None,
    grammar: str | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: str | Mapping[str, Any] | None = None,
    parallel_tool_calls: bool = True,
) -> pb.GenerateRequest:
    """The GenerateRequest for these arguments; None (the default) leaves a parameter to the router.

    prompt / prompt_token_ids / messages: the prompt as text, as token ids, or as a conversation
    (roles "system", "user", "assistant"; the router applies the model's chat template and opens
    the assistant's turn); exactly one is required.
    max_new_tokens: most tokens to generate (the router's --default-max-new-tokens when unset).
    temperature: 0 means greedy (1.0 when unset). top_k: 0 disables. top_p: nucleus mass in (0, 1].
    repetition_penalty: > 1 discourages repeats. seed: same seed, same text (unset: the router picks).
    stop: a string or strings that end the output (excluded). ignore_eos: keep going past
    end-of-sequence. logprobs: return each token's log-probability; top_logprobs: also the N
    (at most 20) most likely tokens at each step (needs logprobs). priority: higher is served first.
    speculative: False opts out of the server's speculative decoding (same output, other speed).
    Structured output (at most one): json_schema (a dict, or its JSON text) for one JSON value valid
    under it, json_object=True for any JSON object, regex for text matching it whole, choice for
    exactly one of the strings, grammar for a Lark (or GBNF) grammar. The router refuses an invalid
    one with INVALID_ARGUMENT; an output that ends with EOS follows it.
    tools (with messages): OpenAI-shaped function definitions, shown to the chat template;
    tool_choice "auto" (the default with tools), "none", "required" or a function's name (or
    {"type": "function", "function": {"name": ...}}); required and named calls constrain the
    output, and `chat` answers them in `GenerateResult.tool_calls` (common/tool_calls.py).
    Raises InvalidRequestError (a ValueError) when not exactly one prompt form is given or a number
    is out of what its field can carry; TypeError for a prompt or a message of the wrong type.
    """
    _check_range("parameters.max_new_tokens", max_new_tokens, 1, UINT32)
    _check_range("parameters.top_k", top_k, 0, UINT32, " (0 disables it)")
    _check_range("parameters.seed", seed, 0, UINT64)
    _check_range("parameters.top_logprobs", top_logprobs, 0, UINT32)
    _check_range("priority", priority, -INT32 - 1, INT32)
    given = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
             "repetition_penalty": repetition_penalty, "seed": seed, "top_logprobs": top_logprobs}
    parameters = pb.Parameters(
        stop=[stop] if isinstance(stop, str) else list(stop or ()),  # one string is one sequence
        ignore_eos=ignore_eos,
        logprobs=logprobs,
        **({} if speculative else {"speculative": False}),
        **{name: value for name, value in given.items() if value is not None},
    )
    request = pb.GenerateRequest(parameters=parameters, priority=priority)
    _set_prompt(request, prompt, prompt_token_ids, messages)
    plan = tool_plan(tools, tool_choice, parallel_tool_calls)
    if plan is not None:
        if messages is None:
            raise invalid("tools need messages (a chat request)")
        request.messages.tools = json.dumps(list(plan.tools), ensure_ascii=False)
        forced = plan.constraint()
        if forced is not None:
            if json_schema is not None or json_object or regex is not None or choice is not None or grammar is not None:
                raise invalid(f'tool_choice "{plan.mode}" constrains the output to tool calls; it cannot be '
                              f"combined with another constraint")
            json_schema = forced
    _set_constraint(request, json_schema, json_object, regex, choice, grammar)
    return request


def tool_plan(tools: Sequence[Mapping[str, Any]] | None, tool_choice: str | Mapping[str, Any] | None,
              parallel_tool_calls: bool = True) -> ToolPlan | None:
    """The tool plan of `chat`'s tools arguments (None: no tools in play); a bare name is that function."""
    if isinstance(tool_choice, str) and tool_choice not in ("none", "auto", "required"):
        tool_choice = {"type": "function", "function": {"name": tool_choice}}
    try:
        return ToolPlan.of([dict(t) for t in tools or ()], tool_choice, parallel_tool_calls)
    except BadField as bad:
        raise invalid(f"{bad.param}: {bad}") from None


def _set_constraint(request: pb.GenerateRequest, json_schema: Mapping[str, Any] | str | None, json_object: bool,
                    regex: str | None, choice: Sequence[str] | None, grammar: str | None) -> None:
    given = {name: value for name, value in (("json_schema", json_schema), ("json_object", json_object or None),
                                             ("regex", regex), ("choice", choice), ("grammar", grammar))
             if value is not None}
    if len(given) > 1:
        raise invalid(f"at most one constraint may be given, got {' and '.join(given)}")
    if not given:
        return
    (name, value), = given.items()
    if name == "json_schema" and not isinstance(value, str):
        value = json.dumps(value)
    if name == "choice":
        if isinstance(value, str):
            raise TypeError("choice must be a sequence of strings, such as ['yes', 'no']")
        request.constraint.choice.choices.extend(value)
        request.constraint.choice.SetInParent()
    else:
        setattr(request.constraint, name, value)


def _check_range(field: str, value: int | None, low: int, high: int, note: str = "") -> None:
    """Refuses an integer the router would refuse, or that its wire type cannot carry."""
    if value is None or isinstance(value, bool) or not isinstance(value, int):
        return  # unset, or a wrong type that protobuf reports with a TypeError
    if value < low:
        raise invalid(f"{field} must be at least {low}{note}, got {value}")
    if value > high:
        raise invalid(f"{field} must be at most {high}, got {value}")


def _set_prompt(request: pb.GenerateRequest, prompt: str | None, token_ids: Sequence[int] | None,
                messages: Sequence[ChatMessage] | None) -> None:
    """Fill the request's `input` oneof; exactly one of the three forms may be given."""
    given = [name for name, value in (("prompt", prompt), ("prompt_token_ids", token_ids), ("messages", messages))
             if value is not None]
    if len(given) != 1:
        raise invalid("exactly one of prompt, prompt_token_ids and messages is required, "
                      f"got {' and '.join(given) if given else 'none'}")
    if messages is not None:
        _set_messages(request, messages)
        return
    if prompt is not None:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}; "
                            "pass token ids as prompt_token_ids=")
        request.prompt = prompt
        return
    ids = list(token_ids)  # type: ignore[arg-type]
    for i, token_id in enumerate(ids):
        if isinstance(token_id, int) and not 0 <= token_id <= UINT32:
            bound = "at least 0" if token_id < 0 else f"at most {UINT32}"
            raise invalid(f"prompt_token_ids[{i}] = {token_id} is outside the vocabulary (a token id is {bound})")
    request.prompt_token_ids.ids.extend(ids)
    request.prompt_token_ids.SetInParent()  # an empty id list still selects the oneof


def _set_messages(request: pb.GenerateRequest, messages: Sequence[ChatMessage]) -> None:
    """The conversation, in order; each turn a {"role", "content"} mapping or a (role, content) pair."""
    if isinstance(messages, (str, Mapping)):
        raise TypeError("messages must be a sequence of turns such as [{'role': 'user', 'content': 'Hi'}]")
    for i, turn in enumerate(messages):
        role, content = (turn.get("role"), turn.get("content")) if isinstance(turn, Mapping) else tuple(turn)
        if not isinstance(role, str) or not isinstance(content, str):
            raise TypeError(f"messages[{i}] needs a str role and a str content, got {turn!r}")
        request.messages.messages.add(role=role, content=content)
    request.messages.SetInParent()  # an empty conversation still selects the oneof
