"""shardline.client: the Python SDK of the shardline router (sync `Client`, asyncio `AsyncClient`).

Importing it loads grpc and the generated protobuf modules only (no torch, no transformers).
"""

from shardline.client.aio import AsyncClient
from shardline.client.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    OverloadedError,
    RequestCancelledError,
    ShardlineError,
    UnauthenticatedError,
    UnavailableError,
    to_error,
)
from shardline.client.requests import ChatMessage
from shardline.client.results import (
    FinishReason,
    GenerateResult,
    ServerInfo,
    ShardInfo,
    StreamChunk,
    TokenLogprob,
    Usage,
)
from shardline.client.sdk import Client

__all__ = [
    "AsyncClient",
    "ChatMessage",
    "Client",
    "DeadlineExceededError",
    "FinishReason",
    "GenerateResult",
    "InvalidRequestError",
    "OverloadedError",
    "RequestCancelledError",
    "ServerInfo",
    "ShardInfo",
    "ShardlineError",
    "StreamChunk",
    "TokenLogprob",
    "UnauthenticatedError",
    "UnavailableError",
    "Usage",
    "to_error",
]
