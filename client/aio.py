"""The asyncio SDK: `AsyncClient`, a grpc.aio client of the shardline router.

The same API as `Client` (sdk.py) with `await` / `async for`; it owns only the aio channel and
the call loops, sharing request building, response conversion, error mapping and the retry
policy with the sync client. Create it inside the event loop that uses it.

    async with AsyncClient("localhost:8500") as client:
        async for chunk in client.generate_stream("Once upon a time", max_new_tokens=32):
            print(chunk.text, end="", flush=True)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardline.client.connection import auth_metadata, channel_credentials
from shardline.client.errors import Attempts, Channel, RetryPolicy, health_from_error
from shardline.client.requests import ChatMessage, GenerateParams, build_request, channel_options, tool_plan
from shardline.client.results import (
    GenerateResult,
    ServerInfo,
    StreamChunk,
    chunk_from_pb,
    info_from_pb,
    result_from_pb,
    with_tool_calls,
)
from shardline.proto import serving_pb2 as pb
from shardline.proto import serving_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from typing_extensions import Unpack


class AsyncClient:
    """An asyncio client of a shardline router at `target` ("host:port" or "unix:///path").

    Parameters left unset are not sent: the router's defaults apply (e.g. --default-max-new-tokens).
    Retries, timeouts, errors and security (`api_key`, `root_certificates`, `tls`, `credentials`)
    behave as in `Client`. Leaving `generate_stream` early (`break`,
    `aclose()`, or cancelling the task) cancels the RPC so the router frees the request.
    """

    def __init__(
        self,
        target: str,
        *,
        retries: int = 3,
        backoff: float = 0.5,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        api_key: str | None = None,
        root_certificates: bytes | None = None,
        tls: bool = False,
    ) -> None:
        self.target = target
        self._policy = RetryPolicy(retries, backoff)
        self._metadata = auth_metadata(api_key)
        options = channel_options(options)
        credentials = channel_credentials(credentials, root_certificates, tls)
        self._channel_kind = Channel(tls=credentials is not None, api_key=api_key is not None)
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        self._stub = pb_grpc.GenerationStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; calls still running are cancelled."""
        await self._channel.close()

    async def generate(
        self, prompt: str | None = None, *, timeout: float | None = None, **params: Unpack[GenerateParams]
    ) -> GenerateResult:
        """Generate a completion and return it whole (parameters: see `requests.build_request`)."""
        request = build_request(prompt, **params)
        response = await self._unary(self._stub.Generate, request, timeout)
        return result_from_pb(response, logprobs=request.parameters.logprobs)

    def generate_stream(
        self, prompt: str | None = None, *, timeout: float | None = None, **params: Unpack[GenerateParams]
    ) -> AsyncIterator[StreamChunk]:
        """An async generator of one StreamChunk per token (use with `async for`).

        The arguments are checked at once (InvalidRequestError here, not at the first `__anext__`).
        """
        return self._stream(build_request(prompt, **params), timeout)

    async def chat(
        self, messages: Sequence[ChatMessage], *, timeout: float | None = None, **params: Unpack[GenerateParams]
    ) -> GenerateResult:
        """The assistant's reply to `messages` (the model's chat template applied by the router), whole."""
        request = build_request(messages=messages, **params)
        response = await self._unary(self._stub.Generate, request, timeout)
        plan = tool_plan(params.get("tools"), params.get("tool_choice"), params.get("parallel_tool_calls", True))
        return with_tool_calls(result_from_pb(response, logprobs=request.parameters.logprobs), plan)

    def chat_stream(
        self, messages: Sequence[ChatMessage], *, timeout: float | None = None, **params: Unpack[GenerateParams]
    ) -> AsyncIterator[StreamChunk]:
        """The assistant's reply to `messages`, one StreamChunk per token (use with `async for`)."""
        return self._stream(build_request(messages=messages, **params), timeout)

    async def tokenize(self, text: str, *, timeout: float | None = None) -> list[int]:
        """The token ids Generate uses for `text` as a prompt (the tokenizer's special tokens, such
        as a Llama BOS, included; a text that starts with BOS gets no second one)."""
        response = await self._unary(self._stub.Tokenize, pb.TokenizeRequest(text=text), timeout)
        return list(response.ids)

    async def info(self, *, timeout: float | None = None) -> ServerInfo:
        """The served model, the router's limits and the shard group."""
        return info_from_pb(await self._unary(self._stub.Info, pb.InfoRequest(), timeout))

    async def health(self, service: str = "", *, timeout: float | None = None) -> bool:
        """True iff grpc.health.v1 reports `service` SERVING ("", "liveness" or "readiness")."""
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            response = await self._health.Check(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            return health_from_error(error)
        return response.status == health_pb2.HealthCheckResponse.SERVING

    async def _unary(self, method: Callable[..., Any], request: Any, timeout: float | None) -> Any:
        """Await a unary method, retrying UNAVAILABLE per the policy; raises ShardlineError."""
        attempts = Attempts(self._policy, timeout, self._channel_kind)
        while True:
            try:
                return await method(request, timeout=attempts.timeout(), metadata=self._metadata)
            except grpc.RpcError as error:
                delay = attempts.backoff_after(error)
            await asyncio.sleep(delay)

    async def _stream(self, request: pb.GenerateRequest, timeout: float | None) -> AsyncIterator[StreamChunk]:
        """GenerateStream, retried only while nothing has been yielded; cancelled when closed."""
        attempts = Attempts(self._policy, timeout, self._channel_kind)
        while True:
            call = self._stub.GenerateStream(request, timeout=attempts.timeout(), metadata=self._metadata)
            started = False
            try:
                async for message in call:
                    started = True
                    yield chunk_from_pb(message)
                return
            except grpc.RpcError as error:
                delay = attempts.backoff_after(error, started)
            finally:
                call.cancel()  # a no-op once finished; frees the server's request on early close
            await asyncio.sleep(delay)
