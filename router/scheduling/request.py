"""One generation request inside the router: validated input, progress, and its event stream.

The batcher pushes each sampled token through `on_token` (detokenize, stop strings, finish) and the
RPC handler reads `events`: stream messages, then either a final message or an error status.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc

from shardline.proto import serving_pb2, shard_pb2
from shardline.router.scheduling.detokenizer import IncrementalDetokenizer
from shardline.router.scheduling.queue import Entry
from shardline.router.scheduling.params import ValidRequest



@dataclass(frozen=True)
class Failure:
    """Ends a request's event stream with a gRPC status instead of a final message."""

    code: grpc.StatusCode
    message: str


@dataclass(eq=False)
class RouterRequest(Entry):
    """A request in the router; `tenant` (from Entry) is the caller's name from router/api/auth.py."""

    id: int = 0
    request_id: str = ""
    valid: ValidRequest | None = None
    seed: int = 0
    detokenizer: IncrementalDetokenizer | None = None
    deadline: float | None = None  # time.monotonic() after which the client no longer waits
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[serving_pb2.TokenLogprob]] = field(default_factory=list)  # per token, when asked
    finish_reason: int = serving_pb2.FINISH_REASON_UNSPECIFIED
    cancelled: bool = False
    error: str = ""  # status code name when the request ended with an error
    created: float = field(default_factory=time.monotonic)
    prefilled_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    # Scheduling state (the router's view of the shards; reset when the request leaves them).
    blocks: list[int] = field(default_factory=list)  # KV blocks, in position order
    fed: int = 0  # tokens of prompt + generated sent to the shards (KV written or being written)
    prefill_end: int = 0  # tokens to feed before decoding: len(sequence) when it was (re)admitted
    on_shards: bool = False  # a sequence exists on the shards (a step that started it succeeded)
    admitted_seq: int = 0  # admission order among running requests (preemption takes the newest)
    strikes: int = 0  # failed steps this request was part of
    cached_tokens: int = 0  # prompt tokens found in the prefix cache when it was first admitted
    cache_at: object | None = None  # prefix-cache node after its last cached block; None: caches no more
    cache_blocks: int = 0  # leading blocks already offered to the prefix cache
    speculation: object | None = None  # its n-gram index and backoff (router/scheduling/speculation.py)

    @property
    def done(self) -> bool:
        return self.finish_reason != serving_pb2.FINISH_REASON_UNSPECIFIED

    @property
    def sequence(self) -> list[int]:
        """What the shards must hold to continue: the prompt, then every token streamed so far."""
        return [*self.valid.prompt_token_ids, *self.token_ids]

    @property
    def length(self) -> int:
        """len(self.sequence), without building it."""
        return len(self.valid.prompt_token_ids) + len(self.token_ids)

    def span(self, start: int, stop: int) -> list[int]:
        """self.sequence[start:stop], without building the whole sequence."""
        prompt, n = self.valid.prompt_token_ids, len(self.valid.prompt_token_ids)
        if stop <= n:
            return list(prompt[start:stop])
        if start >= n:
            return self.token_ids[start - n:stop - n]
        return [*prompt[start:], *self.token_ids[:stop - n]]

    @property
    def ends_in_flight(self) -> bool:
        """Known at plan time: the token of the step in flight is its last (max_new_tokens).
        A decoding request that was fed `fed` tokens has fed - prompt_len + 1 tokens once the
        step in flight returns; EOS and stop strings are not known until the token is seen."""
        return not self.prefilling and self.fed - self.prompt_len + 1 >= self.valid.max_new_tokens

    @property
    def prefilling(self) -> bool:
        """Still feeding prompt (or resumed) tokens; False once it decodes its own samples."""
        return self.fed < self.prefill_end

    def is_dead(self) -> bool:
        """Nothing more to compute for it: cancelled, past its deadline, or already finished."""
        return self.cancelled or self.done or (self.deadline is not None and time.monotonic() > self.deadline)

    def new_sequence(self) -> shard_pb2.NewSequence:
        """The shard's view of a starting sequence: sampling parameters and the prompt length."""
        v = self.valid
        return shard_pb2.NewSequence(id=self.id, prompt_len=self.prompt_len, sampling=shard_pb2.SamplingParameters(
            temperature=v.temperature, top_k=v.top_k, top_p=v.top_p, repetition_penalty=v.repetition_penalty,
            seed=self.seed, top_logprobs=v.top_logprobs), grammar=v.grammar)

    def on_token(self, gen: shard_pb2.Generation, eos_ids: frozenset[int]) -> float | None:
        """Records one sampled token, decides whether it ends the request (stop string, EOS unless
        ignore_eos, max_new_tokens) and emits its stream message; returns the inter-token gap."""
        now = time.monotonic()
        gap = None if self.last_token_at is None else now - self.last_token_at
        self.first_token_at = self.first_token_at or now
        self.last_token_at = now
        self.token_ids.append(gen.token_id)
        self.logprobs.append(gen.logprob)
        if self.valid.top_logprobs:
            self.top_logprobs.append([serving_pb2.TokenLogprob(
                token_id=a.token_id, logprob=a.logprob, text=self.detokenizer.token_text(a.token_id))
                for a in gen.top_logprobs])
        text = self.detokenizer.push(gen.token_id)
        if self.detokenizer.stopped:
            self.finish_reason = serving_pb2.FINISH_REASON_STOP
        elif gen.token_id in eos_ids and not self.valid.ignore_eos:
            self.finish_reason = serving_pb2.FINISH_REASON_EOS
        elif len(self.token_ids) >= self.valid.max_new_tokens:
            self.finish_reason = serving_pb2.FINISH_REASON_LENGTH
        if self.done:
            text += self.detokenizer.finish()
        self.events.put_nowait(self._message(gen.token_id, text, gen.logprob))
        return gap

    def _message(self, token_id: int, text: str, logprob: float) -> serving_pb2.GenerateStreamResponse:
        msg = serving_pb2.GenerateStreamResponse(token_id=token_id, text=text, request_id=self.request_id,
                                                 finish_reason=self.finish_reason)
        if self.valid.logprobs:
            msg.logprob = logprob
        if self.valid.top_logprobs:
            msg.top_logprobs.extend(self.top_logprobs[-1])
        if self.done:
            msg.usage.CopyFrom(self.usage())
        return msg

    def usage(self) -> serving_pb2.Usage:
        return serving_pb2.Usage(prompt_tokens=self.prompt_len, completion_tokens=len(self.token_ids),
                                 cached_prompt_tokens=self.cached_tokens)

    def fail(self, code: grpc.StatusCode, message: str) -> None:
        """Ends the request with an error status (the handler aborts the RPC with it)."""
        if not self.done:
            self.finish_reason = serving_pb2.FINISH_REASON_CANCELLED
            self.error = code.name
            self.events.put_nowait(Failure(code, message))

    def summary(self) -> dict[str, object]:
        """The fields of the one log line written per request."""
        def since(t: float | None) -> float | None:
            return None if t is None else round(t - self.created, 4)
        return {"request_id": self.request_id, "tenant": self.tenant, "prompt_tokens": self.prompt_len,
                "generated_tokens": len(self.token_ids), "queue_s": since(self.prefilled_at),
                "ttft_s": since(self.first_token_at), "total_s": since(time.monotonic()),
                "finish_reason": self._finish_name(), **({"error": self.error} if self.error else {})}

    def _finish_name(self) -> str:
        if self.error:
            return "error"
        if self.cancelled and not self.done:
            return "cancelled"
        return serving_pb2.FinishReason.Name(self.finish_reason).removeprefix("FINISH_REASON_").lower()

    def response(self) -> serving_pb2.GenerateResponse:
        """The unary answer of a finished request."""
        return serving_pb2.GenerateResponse(
            text=self.detokenizer.text, token_ids=self.token_ids,
            logprobs=self.logprobs if self.valid.logprobs else [], finish_reason=self.finish_reason,
            usage=self.usage(), request_id=self.request_id,
            top_logprobs=[serving_pb2.TopLogprobs(alternatives=a) for a in self.top_logprobs])
