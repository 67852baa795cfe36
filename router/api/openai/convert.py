"""OpenAI request bodies → the native requests the front door validates, one per choice.

A completion asks for n choices of each of its prompts; a chat completion for n choices of its
conversation. Each choice becomes one `GenerateRequest` (the same message the gRPC API takes, so the
router's own validation applies, with the same rules and messages); choice j of a request with a
seed gets seed + j, so the n samples differ and choice 0 equals the gRPC request with that seed.

Only what the native message cannot carry is checked here (negative counts, token ids, seeds past
64 bits), worded as the router words its refusals. `http_wording` rewrites a router message in the
client's field names (parameters.max_new_tokens → max_tokens, ...).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from shardline.proto import serving_pb2 as pb
from shardline.router.api.openai.schema import NEUTRAL, ChatBody, CompletionBody, StructuredOutputs, _Sampling
from shardline.common import tool_calls
from shardline.common.tool_calls import ToolPlan


UINT32, UINT64, INT64 = 2**32 - 1, 2**64 - 1, 2**63
# Chat roles of the OpenAI API that mean the same as one of the router's.
ROLE_ALIASES = {"developer": "system"}


class BadField(ValueError):
    """A request field the API refuses: 400 invalid_request_error with `param` = the field."""

    def __init__(self, param: str, message: str, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param, self.code = param, code


@dataclass(frozen=True)
class Choice:
    """One generation of an HTTP request: its index in `choices`, the request, its seed."""

    index: int
    prompt_index: int
    request: pb.GenerateRequest
    seed: int | None


@dataclass(frozen=True)
class Plan:
    """What one HTTP request asks for: its choices and how to answer."""

    choices: list[Choice]
    stream: bool
    include_usage: bool
    logprobs: bool
    names: dict[str, str] = field(default_factory=dict)  # native field -> the client's field
    tools: ToolPlan | None = None  # chat with tools in play: how the output is answered


def completion_plan(body: CompletionBody, max_choices: int, max_n: int = 2**31) -> Plan:
    """The choices of POST /v1/completions."""
    _check_neutral(body)
    if body.logprobs is not None and body.logprobs < 0:
        raise BadField("logprobs", f"logprobs must be at least 0, got {body.logprobs}")
    parameters = _parameters(body, "max_tokens", body.max_tokens, logprobs=body.logprobs is not None,
                             top_logprobs=body.logprobs or None)
    prompts = [_prompt_request(p) for p in _prompt_list(body.prompt)]
    constraint = _constraint(body)
    for request in prompts:
        request.parameters.CopyFrom(parameters)
        if constraint is not None:
            request.constraint.CopyFrom(constraint)
    names = {"parameters.max_new_tokens": "max_tokens", "prompt_token_ids": "prompt",
             "parameters.top_logprobs": "logprobs"}
    return _plan(body, prompts, (max_choices, max_n), body.logprobs is not None, names)


def chat_plan(body: ChatBody, max_choices: int, max_n: int = 2**31) -> Plan:
    """The choices of POST /v1/chat/completions."""
    _check_neutral(body)
    if body.top_logprobs and not body.logprobs:
        raise BadField("top_logprobs", "top_logprobs needs logprobs: true")
    name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    request = pb.GenerateRequest(parameters=_parameters(body, name, limit, logprobs=body.logprobs,
                                                        top_logprobs=body.top_logprobs or None))
    for message in body.messages:
        request.messages.messages.add(role=ROLE_ALIASES.get(message.role, message.role), content=message.text())
    try:
        tools = ToolPlan.of(body.tools, body.tool_choice, body.parallel_tool_calls)
    except tool_calls.BadField as bad:
        raise BadField(bad.param, str(bad)) from None
    constraint = _constraint(body)
    if tools is not None:
        request.messages.tools = json.dumps(list(tools.tools), ensure_ascii=False)
        forced = tools.constraint()
        if forced is not None:
            if constraint is not None:
                raise BadField("tool_choice", f'tool_choice "{tools.mode}" constrains the output to tool calls; '
                                              f"it cannot be combined with response_format or structured_outputs")
            constraint = pb.Constraint(json_schema=json.dumps(forced, ensure_ascii=False))
    if constraint is not None:
        request.constraint.CopyFrom(constraint)
    plan = _plan(body, [request], (max_choices, max_n), body.logprobs, {"parameters.max_new_tokens": name})
    return dataclasses.replace(plan, tools=tools)


def _constraint(body: _Sampling) -> pb.Constraint | None:
    """The native constraint of `response_format` or the extra body `structured_outputs` (one of them)."""
    fmt, extra = body.response_format, body.structured_outputs
    kind = (fmt or {}).get("type", "text")
    if fmt is not None and kind not in ("text", "json_object", "json_schema"):
        raise BadField("response_format", f'response_format.type must be "text", "json_object" or "json_schema", '
                                          f"got {kind!r}")
    values = {} if extra is None else {"json": extra.schema_, "regex": extra.regex, "choice": extra.choice,
                                       "grammar": extra.grammar}
    given = [k for k, v in values.items() if v is not None]
    if len(given) > 1:
        raise BadField("structured_outputs", f"structured_outputs takes one of json, regex, choice and grammar, "
                                             f"got {' and '.join(given)}")
    if given and kind != "text":
        raise BadField("structured_outputs", "structured_outputs cannot be combined with response_format")
    if kind == "json_object":
        return pb.Constraint(json_object=True)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
            raise BadField("response_format", 'response_format json_schema needs {"json_schema": {"name": ..., '
                                              '"schema": {...}}}')
        return pb.Constraint(json_schema=json.dumps(spec.get("schema", {}), ensure_ascii=False))
    if not given:
        return None
    value = values[given[0]]
    if given[0] == "json":
        if value is True:
            return pb.Constraint(json_object=True)
        if value is False:
            raise BadField("structured_outputs", "structured_outputs.json is a schema, its JSON text, or true")
        return pb.Constraint(json_schema=value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
    if given[0] == "choice":
        return pb.Constraint(choice=pb.Choices(choices=value))
    return pb.Constraint(**{given[0]: value})


def http_wording(message: str, names: dict[str, str]) -> str:
    """A router message in the HTTP client's field names."""
    for native, http in names.items():
        message = message.replace(native, http)
    return message.replace("parameters.", "")


def http_param(native: str | None, names: dict[str, str]) -> str | None:
    """The HTTP field for a router ValidationError field."""
    if native is None:
        return None
    return names.get(native, native.removeprefix("parameters.").split("[")[0])


def _plan(body: _Sampling, prompts: list[pb.GenerateRequest], caps: tuple[int, int], logprobs: bool,
          names: dict[str, str]) -> Plan:
    """`caps`: (--max-concurrent-requests, --max-n), both bounding n x prompts."""
    max_choices, max_n = caps
    if body.n < 1:
        raise BadField("n", f"n must be at least 1, got {body.n}")
    if body.n * len(prompts) > max_n:
        raise BadField("n", f"n x prompts = {body.n * len(prompts)} generations, more than --max-n={max_n}")
    if body.n * len(prompts) > max_choices:
        raise BadField("n", f"n x prompts = {body.n * len(prompts)} generations, more than "
                            f"--max-concurrent-requests={max_choices} can ever admit at once")
    choices = [Choice(i * body.n + j, i, request, None if body.seed is None else (body.seed + j) % 2**64)
               for i, request in enumerate(prompts) for j in range(body.n)]
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if body.stream_options is not None and not body.stream:
        raise BadField("stream_options", "stream_options is only allowed with stream: true")
    return Plan(choices, body.stream, include_usage, logprobs, names)


def _check_neutral(body: _Sampling) -> None:
    for name, values in NEUTRAL.items():
        value = getattr(body, name, None)
        if value not in values:
            raise BadField(name, f"{name} is not supported by this server (got {value!r}); "
                                 f"leave it out or send {values[1]!r}", "unsupported_parameter")


def _parameters(body: _Sampling, max_name: str, max_tokens: int | None, logprobs: bool,
                top_logprobs: int | None) -> pb.Parameters:
    """The native Parameters (unset fields stay unset: the router's defaults apply)."""
    _check_range(max_name, max_tokens, 1, UINT32)
    _check_range("top_logprobs", top_logprobs, 0, UINT32)
    top_k = 0 if body.top_k == -1 else body.top_k  # -1 is how vLLM users say "disabled"
    _check_range("top_k", top_k, 0, UINT32, " (0 or -1 disables it)")
    seed = body.seed
    if seed is not None and not -INT64 <= seed <= UINT64:
        raise BadField("seed", f"seed must be a 64-bit integer, got {seed}")
    given = {"max_new_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p,
             "top_k": top_k, "repetition_penalty": body.repetition_penalty,
             "seed": None if seed is None else seed % 2**64, "top_logprobs": top_logprobs}
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or ())
    return pb.Parameters(stop=stop, ignore_eos=body.ignore_eos, logprobs=logprobs,
                         **({} if body.speculative else {"speculative": False}),
                         **{k: v for k, v in given.items() if v is not None})


def _check_range(name: str, value: int | None, low: int, high: int, note: str = "") -> None:
    if value is None:
        return
    if value < low:
        raise BadField(name, f"{name} must be at least {low}{note}, got {value}")
    if value > high:
        raise BadField(name, f"{name} must be at most {high}, got {value}")


def _prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """The prompts of a completion: one text, one id list, or a list of either."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise BadField("prompt", "prompt is empty")
    if all(isinstance(p, int) for p in prompt):
        return [prompt]  # type: ignore[list-item]
    return list(prompt)  # type: ignore[arg-type]


def _prompt_request(prompt: str | list[int]) -> pb.GenerateRequest:
    if isinstance(prompt, str):
        return pb.GenerateRequest(prompt=prompt)
    for i, token_id in enumerate(prompt):
        if not 0 <= token_id <= UINT32:
            bound = "at least 0" if token_id < 0 else f"at most {UINT32}"
            raise BadField("prompt", f"prompt[{i}] = {token_id} is outside the vocabulary (a token id is {bound})")
    request = pb.GenerateRequest(prompt_token_ids=pb.PromptTokenIds(ids=prompt))
    request.prompt_token_ids.SetInParent()
    return request
