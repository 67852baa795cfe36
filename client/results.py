"""Typed results of the client SDK and their conversion from the public protobuf messages.

Protobuf stops here: `Client` and `AsyncClient` hand back only these frozen dataclasses, built
by the `*_from_pb` functions that both clients share.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from shardline.common.tool_calls import ToolCall, ToolPlan
from shardline.proto import serving_pb2 as pb

FinishReason = Literal["length", "eos", "stop", "cancelled"]
"""Why generation ended: max_new_tokens reached, end-of-sequence token, stop string, cancelled."""

_FINISH_PREFIX = "FINISH_REASON_"


@dataclass(frozen=True)
class Usage:
    """Token counts of a finished request."""

    prompt_tokens: int
    completion_tokens: int
    # Prompt tokens served from the server's prefix cache (not computed again).
    cached_prompt_tokens: int = 0


@dataclass(frozen=True)
class TokenLogprob:
    """One of the most likely tokens at a step: id, log-probability, and its own text."""

    token_id: int
    logprob: float
    text: str


@dataclass(frozen=True)
class GenerateResult:
    """A whole completion, as returned by `generate`."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[float] | None
    request_id: str
    # Prompt tokens served from the server's prefix cache (not computed again).
    cached_prompt_tokens: int = 0
    # With top_logprobs=N: for each generated token, the N most likely tokens at its step.
    top_logprobs: list[list[TokenLogprob]] | None = None
    # `chat` with tools: the calls the reply makes (id, name, arguments as JSON text); None without
    # tools, [] when the reply is text.
    tool_calls: list[ToolCall] | None = None


def with_tool_calls(result: GenerateResult, plan: ToolPlan | None) -> GenerateResult:
    """`result` with the tool calls of its text (a reply cut by max_new_tokens makes none)."""
    if plan is None:
        return result
    calls = [] if result.finish_reason == "length" else plan.parse(result.text)[1]
    return dataclasses.replace(result, tool_calls=calls)


@dataclass(frozen=True)
class StreamChunk:
    """One generated token of `generate_stream`; `finish_reason` and `usage` only on the last."""

    token_id: int
    text: str
    logprob: float | None
    finish_reason: FinishReason | None
    usage: Usage | None
    request_id: str
    # With top_logprobs=N: the N most likely tokens at this token's step, most likely first.
    top_logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class ShardInfo:
    """One shard process of the group: its ranks, device, memory and pipeline layer range."""

    rank: int
    tp_rank: int
    pp_rank: int
    device: str
    dtype: str
    parameter_bytes: int
    kv_capacity_tokens: int
    first_layer: int
    last_layer: int
    environment: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ServerInfo:
    """The served model, the limits the router enforces and the shard group (see `info`)."""

    model: str
    model_type: str
    vocab_size: int
    tp_size: int
    pp_size: int
    max_input_tokens: int
    max_total_tokens: int
    max_concurrent_requests: int
    max_batch_prefill_tokens: int
    max_batch_total_tokens: int
    version: str
    restarts: int
    shards: list[ShardInfo] = field(default_factory=list)


def finish_reason_from_pb(value: int) -> FinishReason | None:
    """"length"/"eos"/"stop"/"cancelled" for a FinishReason enum value; None when unspecified."""
    if value == pb.FINISH_REASON_UNSPECIFIED:
        return None
    try:
        name = pb.FinishReason.Name(value)
    except ValueError:  # a newer server's reason this client does not know
        return f"unknown_{value}"  # type: ignore[return-value]
    return name.removeprefix(_FINISH_PREFIX).lower()  # type: ignore[return-value]


def result_from_pb(response: pb.GenerateResponse, logprobs: bool) -> GenerateResult:
    """The GenerateResult of a Generate response; `logprobs` says whether they were requested."""
    return GenerateResult(
        text=response.text,
        token_ids=list(response.token_ids),
        finish_reason=finish_reason_from_pb(response.finish_reason),
        prompt_tokens=response.usage.prompt_tokens,
        completion_tokens=response.usage.completion_tokens,
        logprobs=list(response.logprobs) if logprobs else None,
        request_id=response.request_id,
        cached_prompt_tokens=response.usage.cached_prompt_tokens,
        top_logprobs=[[_alternative(a) for a in step.alternatives] for step in response.top_logprobs] or None,
    )


def chunk_from_pb(message: pb.GenerateStreamResponse) -> StreamChunk:
    """The StreamChunk of one GenerateStream message."""
    usage = None
    if message.HasField("usage"):
        usage = Usage(message.usage.prompt_tokens, message.usage.completion_tokens,
                      message.usage.cached_prompt_tokens)
    return StreamChunk(
        token_id=message.token_id,
        text=message.text,
        logprob=message.logprob if message.HasField("logprob") else None,
        finish_reason=finish_reason_from_pb(message.finish_reason),
        usage=usage,
        request_id=message.request_id,
        top_logprobs=[_alternative(a) for a in message.top_logprobs] or None,
    )


def _alternative(alternative: pb.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(alternative.token_id, alternative.logprob, alternative.text)


def shard_from_pb(shard: pb.ShardInfo) -> ShardInfo:
    """The ShardInfo of one shard entry of an Info response."""
    return ShardInfo(
        rank=shard.rank,
        tp_rank=shard.tp_rank,
        pp_rank=shard.pp_rank,
        device=shard.device,
        dtype=shard.dtype,
        parameter_bytes=shard.parameter_bytes,
        kv_capacity_tokens=shard.kv_capacity_tokens,
        first_layer=shard.first_layer,
        last_layer=shard.last_layer,
        environment=dict(shard.environment),
    )


def info_from_pb(response: pb.InfoResponse) -> ServerInfo:
    """The ServerInfo of an Info response."""
    return ServerInfo(
        model=response.model,
        model_type=response.model_type,
        vocab_size=response.vocab_size,
        tp_size=response.tp_size,
        pp_size=response.pp_size,
        max_input_tokens=response.max_input_tokens,
        max_total_tokens=response.max_total_tokens,
        max_concurrent_requests=response.max_concurrent_requests,
        max_batch_prefill_tokens=response.max_batch_prefill_tokens,
        max_batch_total_tokens=response.max_batch_total_tokens,
        version=response.version,
        restarts=response.restarts,
        shards=[shard_from_pb(shard) for shard in response.shards],
    )
