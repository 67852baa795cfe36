"""Validation of public generation requests, before admission.

Owns every rule a `GenerateRequest` must pass to be queued and the defaults of its unset
parameters, and turns the protobuf message into a frozen `ValidRequest` (protobuf stops here).
Each failure raises `ValidationError`, whose message names the field and the limit or number at
fault; the server sends it to the client as INVALID_ARGUMENT.

Validation has two steps around tokenization, which the caller runs off the event loop:
`prompt_text` / `chat_turns` apply the checks that need no tokenizer (above all the byte bound, so
that megabytes are refused before anyone spends seconds tokenizing them) and return the text or the
conversation to tokenize; `validate` then checks everything else, given their token ids.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

from shardline.proto import serving_pb2
from shardline.router.scheduling.params import ValidRequest

# A token of a real tokenizer rarely spans more than a few bytes (about 4 on English text); 32 per
# token leaves room for long runs of spaces or symbols while keeping the bound far below megabytes.
BYTES_PER_TOKEN = 32
CHAT_ROLES = ("system", "user", "assistant")
MAX_TOP_LOGPROBS = 20  # the most alternatives the shards return per token


@dataclass(frozen=True)
class Limits:
    """The request limits the router enforces (from its command line and the model)."""

    max_input_tokens: int
    max_total_tokens: int
    vocab_size: int
    max_stop_sequences: int = 8
    max_stop_length: int = 256
    default_max_new_tokens: int = 64
    # --max-request-bytes: longest text in UTF-8 bytes; 0 = BYTES_PER_TOKEN x max_input_tokens.
    max_request_bytes: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            least = 0 if f.name == "max_request_bytes" else 1
            if getattr(self, f.name) < least:
                raise ValueError(f"{f.name} must be at least {least}, got {getattr(self, f.name)}")
        if self.max_input_tokens > self.max_total_tokens:
            raise ValueError(
                f"--max-input-tokens={self.max_input_tokens} must not exceed "
                f"--max-total-tokens={self.max_total_tokens}"
            )


class ValidationError(ValueError):
    """A request broke a rule; `field` is the request field at fault (e.g. "parameters.top_p")."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class ChatTurn:
    """One message of a chat request: role (one of CHAT_ROLES) and content."""

    role: str
    content: str


def prompt_text(request: serving_pb2.GenerateRequest, limits: Limits) -> str | None:
    """The text prompt to tokenize (None when the request carries token ids or messages), checked
    for presence and against the byte bound before any tokenizer sees it."""
    field = request.WhichOneof("input")
    if field is None:
        raise ValidationError(
            "input", "exactly one of prompt, prompt_token_ids or messages is required, got none")
    if field != "prompt":
        return None
    if not request.prompt:
        raise ValidationError(field, "prompt is empty")
    check_text_bytes(field, request.prompt, limits)
    return request.prompt


def chat_turns(request: serving_pb2.GenerateRequest, limits: Limits) -> tuple[ChatTurn, ...]:
    """The conversation of a `messages` request: at least one turn, known roles, within the byte bound."""
    turns = tuple(ChatTurn(m.role, m.content) for m in request.messages.messages)
    if not turns:
        raise ValidationError("messages", "messages is empty")
    for i, turn in enumerate(turns):
        if turn.role not in CHAT_ROLES:
            raise ValidationError(
                "messages", f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {turn.role!r}")
    size = sum(_utf8_size(t.role) + _utf8_size(t.content) for t in turns) + _utf8_size(request.messages.tools)
    _check_bytes("messages", size, limits)
    return turns


def chat_tools(request: serving_pb2.GenerateRequest) -> list[dict] | None:
    """The tool definitions of a `messages` request (None when it has none), checked for shape:
    a JSON array of {"type": "function", "function": {"name": ..., "parameters": {...}}}."""
    text = request.messages.tools
    if not text:
        return None
    try:
        tools = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValidationError("messages.tools", f"messages.tools is not JSON ({exc})") from None
    if not isinstance(tools, list):
        raise ValidationError("messages.tools", "messages.tools must be a JSON array of tool definitions")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise ValidationError("messages.tools", f'messages.tools[{i}] must be {{"type": "function", '
                                                    f'"function": {{...}}}}')
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise ValidationError("messages.tools", f"messages.tools[{i}].function.name must be a non-empty string")
        if not isinstance(function.get("parameters", {}), dict):
            raise ValidationError("messages.tools", f"messages.tools[{i}].function.parameters must be a JSON schema "
                                                    f"object")
    return tools


def _utf8_size(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def check_text_bytes(field: str, text: str, limits: Limits) -> None:
    """Refuses `text` when its UTF-8 encoding is longer than the byte bound."""
    limit = limits.max_request_bytes or BYTES_PER_TOKEN * limits.max_input_tokens
    if len(text) > limit // 4:  # at most 4 bytes per character: below that, surely within
        _check_bytes(field, _utf8_size(text), limits)


def _check_bytes(field: str, size: int, limits: Limits) -> None:
    limit = limits.max_request_bytes or BYTES_PER_TOKEN * limits.max_input_tokens
    if size > limit:
        derived = "" if limits.max_request_bytes else (
            f" ({BYTES_PER_TOKEN} bytes per token of --max-input-tokens={limits.max_input_tokens})")
        raise ValidationError(field, f"{field} has {size} bytes, more than --max-request-bytes={limit}{derived}")


def check_token_count(field: str, count: int, limits: Limits) -> None:
    """Refuses a prompt (or text) of more than --max-input-tokens tokens."""
    if count > limits.max_input_tokens:
        raise ValidationError(
            field, f"{field} has {count} tokens, more than --max-input-tokens={limits.max_input_tokens}")


def validate(
    request: serving_pb2.GenerateRequest,
    limits: Limits,
    text_ids: Sequence[int] | None = None,
) -> ValidRequest:
    """Checks `request` against `limits`. A text prompt (or conversation) must have passed
    `prompt_text` (or `chat_turns`), and `text_ids` are its token ids (None for prompt_token_ids)."""
    params = request.parameters
    temperature = _float(params, "temperature", 1.0, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
    top_k = _top_k(params, limits)
    top_p = _float(params, "top_p", 1.0, lambda v: 0 < v <= 1, "in (0, 1]")
    penalty = _float(params, "repetition_penalty", 1.0, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
    stop = _stop(params, limits)
    field, prompt = _prompt_ids(request, limits, text_ids)
    return ValidRequest(
        prompt_token_ids=prompt,
        max_new_tokens=_max_new_tokens(params, field, len(prompt), limits),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=penalty,
        seed=params.seed if params.HasField("seed") else None,
        stop=stop,
        ignore_eos=params.ignore_eos,
        logprobs=params.logprobs,
        priority=request.priority,
        top_logprobs=_top_logprobs(params),
        speculative=params.speculative if params.HasField("speculative") else True,
    )


def _top_logprobs(params: serving_pb2.Parameters) -> int:
    count = params.top_logprobs if params.HasField("top_logprobs") else 0
    if count > MAX_TOP_LOGPROBS:
        raise ValidationError("parameters.top_logprobs",
                              f"parameters.top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {count}")
    if count and not params.logprobs:
        raise ValidationError("parameters.top_logprobs", "parameters.top_logprobs needs parameters.logprobs")
    return count


def _float(
    params: serving_pb2.Parameters, name: str, default: float, ok: Callable[[float], bool], rule: str
) -> float:
    """Optional float parameter `name`, or `default` when unset; raises unless `ok(value)`."""
    value = getattr(params, name) if params.HasField(name) else default
    if not ok(value):
        raise ValidationError(f"parameters.{name}", f"parameters.{name} must be {rule}, got {value:g}")
    return value


def _top_k(params: serving_pb2.Parameters, limits: Limits) -> int:
    top_k = params.top_k if params.HasField("top_k") else 0
    if top_k > limits.vocab_size:
        raise ValidationError(
            "parameters.top_k",
            f"parameters.top_k must be at most the vocabulary size {limits.vocab_size} (0 disables it), got {top_k}",
        )
    return top_k


def _stop(params: serving_pb2.Parameters, limits: Limits) -> tuple[str, ...]:
    stop = tuple(params.stop)
    if len(stop) > limits.max_stop_sequences:
        raise ValidationError(
            "parameters.stop",
            f"parameters.stop has {len(stop)} strings, more than the limit of {limits.max_stop_sequences}",
        )
    for i, s in enumerate(stop):
        if not s:
            raise ValidationError("parameters.stop", f"parameters.stop[{i}] is empty")
        if len(s) > limits.max_stop_length:
            raise ValidationError(
                "parameters.stop",
                f"parameters.stop[{i}] has {len(s)} characters, more than the limit of {limits.max_stop_length}",
            )
    return stop


def _prompt_ids(
    request: serving_pb2.GenerateRequest, limits: Limits, text_ids: Sequence[int] | None
) -> tuple[str, tuple[int, ...]]:
    """(name of the input field used, prompt token ids), checked for length, then vocabulary."""
    field = request.WhichOneof("input")
    if field is None:
        raise ValidationError(
            "input", "exactly one of prompt, prompt_token_ids or messages is required, got none")
    if field != "prompt_token_ids":
        if text_ids is None:
            raise TypeError(f"{field} must be tokenized (after prompt_text / chat_turns) before validate")
        ids = tuple(text_ids)
        if not ids:
            raise ValidationError(field, f"{field} tokenizes to 0 tokens")
    else:
        ids = tuple(request.prompt_token_ids.ids)
        if not ids:
            raise ValidationError(field, "prompt_token_ids is empty")
    check_token_count(field, len(ids), limits)  # before the vocabulary loop: bounded work
    if field == "prompt_token_ids":
        for i, token_id in enumerate(ids):
            if token_id >= limits.vocab_size:
                raise ValidationError(
                    field,
                    f"prompt_token_ids[{i}] = {token_id} is outside the vocabulary (size {limits.vocab_size})",
                )
    return field, ids


def _max_new_tokens(params: serving_pb2.Parameters, field: str, prompt_len: int, limits: Limits) -> int:
    """The requested max_new_tokens, or the default shrunk to what --max-total-tokens leaves."""
    room = limits.max_total_tokens - prompt_len
    if not params.HasField("max_new_tokens"):
        if room < 1:
            raise ValidationError(
                field,
                f"{field} ({prompt_len} tokens) leaves no room for new tokens "
                f"within --max-total-tokens={limits.max_total_tokens}",
            )
        return min(limits.default_max_new_tokens, room)
    requested = params.max_new_tokens
    if requested < 1:
        raise ValidationError(
            "parameters.max_new_tokens", f"parameters.max_new_tokens must be at least 1, got {requested}"
        )
    if requested > room:
        raise ValidationError(
            "parameters.max_new_tokens",
            f"{field} ({prompt_len} tokens) + parameters.max_new_tokens ({requested}) = {prompt_len + requested} "
            f"exceeds --max-total-tokens={limits.max_total_tokens}",
        )
    return requested
