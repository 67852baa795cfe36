"""The synchronous SDK: `Client`, a blocking gRPC client of the shardline router.

It owns the channel and the call loops (retry sleeps, stream cancellation) only; building the
request (`requests.build_request`), reading the responses (`results`), mapping errors and deciding
retries (`errors`) are shared with `AsyncClient` (aio.py).

    with Client("localhost:8500") as client:
        print(client.generate("Hello", max_new_tokens=16, temperature=0).text)
        for chunk in client.generate_stream("Once upon a time", seed=1):
            print(chunk.text, end="", flush=True)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
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

Response = TypeVar("Response")


class Client:
    """A blocking client of a shardline router at `target` ("host:port" or "unix:///path").

    Security: `api_key` is sent as `authorization: Bearer <key>` with every call (routers started
    with --api-key-file require it: UnauthenticatedError otherwise); `root_certificates` (PEM
    bytes of the CA of the router's --tls-cert-file) or `tls=True` (gRPC's default root CAs)
    connect over TLS; `credentials` gives full control (a client certificate for mutual TLS).

    Parameters left unset are not sent: the router's defaults apply (e.g. --default-max-new-tokens).
    UNAVAILABLE is retried `retries` times with exponential backoff starting at `backoff` seconds,
    for unary calls and for streams that have not yielded yet; every other failure raises a
    `ShardlineError` subclass at once. `timeout` arguments bound the whole call, retries included.
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
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._stub = pb_grpc.GenerationStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; calls still running are cancelled."""
        self._channel.close()

    def generate(
        self, prompt: str | None = None, *, timeout: float | None = None, **params: Unpack[GenerateParams]
    ) -> GenerateResult:
        """Generate a completion and return it whole (parameters: see `requests.build_request`)."""
        request = build_request(prompt, **params)
        response = self._unary(self._stub.Generate, request, timeout)
        return result_from_pb(response, logprobs=request.parameters.logprobs)

    def generate_stream(
        self, prompt: str | None = None, *, timeout: float | None = None, **params: Unpack[GenerateParams]
    ) -> Iterator[StreamChunk]:
        """Yield one StreamChunk per generated token; closing the iterator cancels the request.

        The arguments are checked at once (InvalidRequestError here, not at the first `next`).
        """
        return self._stream(build_request(prompt, **params), timeout)

    def chat(
        self, messages: Sequence[ChatMessage], *, timeout: float | None = None, **params: Unpack[GenerateParams]
    ) -> GenerateResult:
        """The assistant's reply to `messages` (the model's chat template applied by the router), whole.

            client.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
        """
        request = build_request(messages=messages, **params)
        response = self._unary(self._stub.Generate, request, timeout)
        plan = tool_plan(params.get("tools"), params.get("tool_choice"), params.get("parallel_tool_calls", True))
        return with_tool_calls(result_from_pb(response, logprobs=request.parameters.logprobs), plan)

    def chat_stream(
        self, messages: Sequence[ChatMessage], *, timeout: float | None = None, **params: Unpack[GenerateParams]
    ) -> Iterator[StreamChunk]:
        """The assistant's reply to `messages`, one StreamChunk per token; closing it cancels."""
        return self._stream(build_request(messages=messages, **params), timeout)

    def tokenize(self, text: str, *, timeout: float | None = None) -> list[int]:
        """The token ids Generate uses for `text` as a prompt (the tokenizer's special tokens, such
        as a Llama BOS, included; a text that starts with BOS gets no second one)."""
        response = self._unary(self._stub.Tokenize, pb.TokenizeRequest(text=text), timeout)
        return list(response.ids)

    def info(self, *, timeout: float | None = None) -> ServerInfo:
        """The served model, the router's limits and the shard group."""
        return info_from_pb(self._unary(self._stub.Info, pb.InfoRequest(), timeout))

    def health(self, service: str = "", *, timeout: float | None = None) -> bool:
        """True iff grpc.health.v1 reports `service` SERVING ("", "liveness" or "readiness")."""
        try:
            response = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout,
                                          metadata=self._metadata)
        except grpc.RpcError as error:
            return health_from_error(error)
        return response.status == health_pb2.HealthCheckResponse.SERVING

    def _unary(self, method: Callable[..., Response], request: Any, timeout: float | None) -> Response:
        """Call a unary method, retrying UNAVAILABLE per the policy; raises ShardlineError."""
        attempts = Attempts(self._policy, timeout, self._channel_kind)
        while True:
            try:
                return method(request, timeout=attempts.timeout(), metadata=self._metadata)
            except grpc.RpcError as error:
                delay = attempts.backoff_after(error)
            time.sleep(delay)

    def _stream(self, request: pb.GenerateRequest, timeout: float | None) -> Iterator[StreamChunk]:
        """GenerateStream, retried only while nothing has been yielded; cancelled when closed."""
        attempts = Attempts(self._policy, timeout, self._channel_kind)
        while True:
            call = self._stub.GenerateStream(request, timeout=attempts.timeout(), metadata=self._metadata)
            started = False
            try:
                for message in call:
                    started = True
                    yield chunk_from_pb(message)
                return
            except grpc.RpcError as error:
                delay = attempts.backoff_after(error, started)
            finally:
                call.cancel()  # a no-op once finished; frees the server's request on early close
            time.sleep(delay)
