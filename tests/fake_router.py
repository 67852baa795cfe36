"""A fake router for the client tests: a real in-process grpc server on port 0 (or a unix socket)
whose fake `Generation` servicer picks its behaviour from the prompt's first word: "invalid",
"overloaded", "internal", "down" (always UNAVAILABLE), "flaky" (UNAVAILABLE on the first call
only), "cut" (one token, then UNAVAILABLE), "slow" (one token every 20 ms until cancelled); any
other prompt gets `max_new_tokens` tokens "t0 ", "t1 ", ... with ids 100, 101, ... A chat request
(messages) plays the scenario of its last message's content; its prompt tokens are its words.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from shardline.client import (
    AsyncClient,
    Client,
    StreamChunk,
)
from shardline.proto import serving_pb2 as pb
from shardline.proto import serving_pb2_grpc as pb_grpc

T = TypeVar("T")
FAILURES = {
    "invalid": (grpc.StatusCode.INVALID_ARGUMENT, "parameters.max_new_tokens: 0 is below 1"),
    "overloaded": (grpc.StatusCode.RESOURCE_EXHAUSTED, "64 requests already admitted"),
    "internal": (grpc.StatusCode.INTERNAL, "boom"),
    "down": (grpc.StatusCode.UNAVAILABLE, "shards not ready"),
}


class FakeGeneration(pb_grpc.GenerationServicer):
    """A Generation servicer driven by the prompt's first word; counts calls per prompt."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.requests: list[pb.GenerateRequest] = []
        self.ended = threading.Event()  # a "slow" stream terminated
        self.completed = False  # ... by running to its end rather than being cancelled
        self._lock = threading.Lock()

    def _start(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> int:
        """Record the call, abort per the scenario, and return this prompt's call number."""
        with self._lock:
            self.requests.append(request)
            self.calls[_text(request)] += 1
            number = self.calls[_text(request)]
        scenario = _text(request).split(" ")[0]
        if scenario in FAILURES or (scenario == "flaky" and number == 1):
            context.abort(*FAILURES.get(scenario, FAILURES["down"]))
        return number

    def _chunks(self, request: pb.GenerateRequest, number: int) -> list[pb.GenerateStreamResponse]:
        count = request.parameters.max_new_tokens if request.parameters.HasField("max_new_tokens") else 64
        chunks = [pb.GenerateStreamResponse(token_id=100 + i, text=f"t{i} ", request_id=f"req-{number}")
                  for i in range(count)]
        for i, chunk in enumerate(chunks):
            if request.parameters.logprobs:
                chunk.logprob = -0.5 * i
            for k in range(request.parameters.top_logprobs):  # the sampled token first, then "a0", "a1", ...
                chunk.top_logprobs.add(token_id=100 + i if k == 0 else k, logprob=-0.5 * i - k,
                                       text=f"t{i} " if k == 0 else f"a{k}")
        words = " ".join(m.content for m in request.messages.messages) if request.messages.messages else request.prompt
        prompt_tokens = len(request.prompt_token_ids.ids) or len(words.split())
        chunks[-1].finish_reason = pb.FINISH_REASON_STOP if request.parameters.stop else pb.FINISH_REASON_LENGTH
        chunks[-1].usage.CopyFrom(pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=count))
        return chunks

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        chunks = self._chunks(request, self._start(request, context))
        return pb.GenerateResponse(
            text="".join(c.text for c in chunks), token_ids=[c.token_id for c in chunks],
            logprobs=[c.logprob for c in chunks if c.HasField("logprob")],
            finish_reason=chunks[-1].finish_reason, usage=chunks[-1].usage, request_id=chunks[-1].request_id,
            top_logprobs=[pb.TopLogprobs(alternatives=c.top_logprobs) for c in chunks if c.top_logprobs],
        )

    def GenerateStream(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator:
        number = self._start(request, context)
        scenario = _text(request).split(" ")[0]
        if scenario == "slow":
            context.add_callback(self.ended.set)
            for i in range(500):
                yield pb.GenerateStreamResponse(token_id=i, text="x", request_id=f"req-{number}")
                time.sleep(0.02)
            self.completed = True
            return
        for chunk in self._chunks(request, number):
            yield chunk
            if scenario == "cut":
                context.abort(grpc.StatusCode.UNAVAILABLE, "shard group restarting")

    def Tokenize(self, request: pb.TokenizeRequest, context: grpc.ServicerContext) -> pb.TokenizeResponse:
        words = request.text.split()
        return pb.TokenizeResponse(ids=[len(w) for w in words], tokens=words)

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.InfoResponse:
        shard = pb.ShardInfo(rank=1, tp_rank=1, pp_rank=0, device="cpu", dtype="float32", parameter_bytes=1234,
                             kv_capacity_tokens=4096, first_layer=0, last_layer=2,
                             environment={"NCCL_SHM_DISABLE": "1"})
        return pb.InfoResponse(model="/models/tiny", model_type="qwen3", vocab_size=331, tp_size=2, pp_size=1,
                               max_input_tokens=100, max_total_tokens=128, max_concurrent_requests=8,
                               max_batch_prefill_tokens=512, max_batch_total_tokens=4096, version="0.1.0",
                               shards=[shard], restarts=3)


def _text(request: pb.GenerateRequest) -> str:
    """The prompt whose first word picks the scenario (a chat's last message)."""
    turns = request.messages.messages
    return turns[-1].content if turns else request.prompt


@dataclass
class Served:
    target: str
    servicer: FakeGeneration


def _serve(address: str) -> tuple[grpc.Server, Served]:
    servicer = FakeGeneration()
    server = grpc.server(ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_GenerationServicer_to_server(servicer, server)
    checker = health.HealthServicer()
    checker.set("", health_pb2.HealthCheckResponse.SERVING)
    checker.set("readiness", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    port = server.add_insecure_port(address)
    server.start()
    target = f"127.0.0.1:{port}" if address.endswith(":0") else address
    return server, Served(target, servicer)


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    server, served = _serve("127.0.0.1:0")
    yield served
    server.stop(None)


@pytest.fixture
def fake(served: Served) -> FakeGeneration:
    """The module's servicer with its call counts reset."""
    served.servicer.__init__()  # type: ignore[misc]
    return served.servicer


@pytest.fixture
def client(served: Served) -> Iterator[Client]:
    with Client(served.target, retries=3, backoff=0.01) as c:
        yield c


def _async(served: Served, body: Callable[[AsyncClient], Awaitable[T]]) -> T:
    """Run `body(client)` with a fresh AsyncClient on a fresh event loop."""
    async def main() -> T:
        async with AsyncClient(served.target, backoff=0.01) as c:
            return await body(c)
    return asyncio.run(main())


async def _collect(stream: AsyncIterator[StreamChunk]) -> list[StreamChunk]:
    return [chunk async for chunk in stream]
