"""The JSON the OpenAI-compatible API answers: completions, chat completions, their stream chunks,
usage and errors, built from the native stream messages of each choice.

`ChoiceText` accumulates one choice (text, token ids, log-probabilities, finish reason); `Shape`
knows the object names and field layout of one endpoint ("text_completion" or "chat.completion").
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from shardline.proto import serving_pb2 as pb
from shardline.common.tool_calls import ToolCall, ToolPlan

FINISH = {pb.FINISH_REASON_EOS: "stop", pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}
# grpc status of a refusal -> (HTTP status, OpenAI error type, error code)
STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", "invalid_value"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable", "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout", "timeout"),
}
INTERNAL = (500, "internal_error", "internal_error")
# A router flag with its value, as in "more than --max-input-tokens=64": an HTTP client cannot set
# it, so it reads "the server's max_input_tokens=64".
_FLAG = re.compile(r"--([a-z][a-z0-9-]*)=")


def error_body(message: str, kind: str, param: str | None, code: str) -> dict[str, Any]:
    """OpenAI's error object; every one has a `code`, and a router limit is named as the server's."""
    message = _FLAG.sub(lambda m: "the server's " + m.group(1).replace("-", "_") + "=", message)
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def status_of(code: grpc.StatusCode) -> tuple[int, str, str]:
    """(HTTP status, error type, error code) for a refusal's grpc status."""
    return STATUS.get(code, INTERNAL)


@dataclass
class ChoiceText:
    """One choice as it streams: the text so far, its tokens and log-probabilities, its end."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    alternatives: list[list[pb.TokenLogprob]] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    request_id: str = ""
    call_id: str = ""  # a streamed named tool call: its id, once its first delta went out

    def add(self, message: pb.GenerateStreamResponse) -> None:
        self.offsets.append(len(self.text))
        self.text += message.text
        self.token_ids.append(message.token_id)
        if message.HasField("logprob"):
            self.logprobs.append(message.logprob)
        self.alternatives.append(list(message.top_logprobs))
        if message.finish_reason:
            self.finish_reason = FINISH.get(message.finish_reason, "stop")
            self.prompt_tokens = message.usage.prompt_tokens
            self.cached_tokens = message.usage.cached_prompt_tokens
        self.request_id = message.request_id


def total_usage(choices: list[ChoiceText], prompts: dict[int, ChoiceText]) -> dict[str, Any]:
    """Usage of a request: each prompt counted once (`prompts`: one choice per prompt), every
    choice's completion tokens; prompt tokens served from the prefix cache as OpenAI reports them."""
    prompt_tokens = sum(c.prompt_tokens for c in prompts.values())
    completion_tokens = sum(len(c.token_ids) for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": sum(c.cached_tokens for c in prompts.values())}}


class Shape:
    """The object layout of one endpoint; `decode(id)` gives a token's own text for logprobs."""

    def __init__(self, chat: bool, model: str, request_id: str, decode, tools: ToolPlan | None = None) -> None:
        self.chat, self.model, self.decode, self.tools = chat, model, decode, tools
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.created = int(time.time())

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind + (".chunk" if chunk and self.chat else ""),
                "created": self.created, "model": self.model}

    def logprobs(self, token_ids: list[int], logprobs: list[float], offsets: list[int],
                 alternatives: list[list[pb.TokenLogprob]]) -> dict[str, Any]:
        """The logprobs object of some tokens (chat: `content`; completions: parallel lists)."""
        tokens = [self.decode(t) for t in token_ids]
        if self.chat:
            return {"content": [{**_entry(t, lp), "top_logprobs": [_entry(a.text, a.logprob) for a in alts]}
                                for t, lp, alts in zip(tokens, logprobs, alternatives)]}
        top = [{a.text: a.logprob for a in alts} for alts in alternatives] if any(alternatives) else None
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets}

    def whole(self, choices: list[ChoiceText], want_logprobs: bool, use: dict[str, int]) -> dict[str, Any]:
        """The answer of a non-streamed request."""
        out = []
        for c in sorted(choices, key=lambda c: c.index):
            lp = self.logprobs(c.token_ids, c.logprobs, c.offsets, c.alternatives) if want_logprobs else None
            finish = c.finish_reason
            if not self.chat:
                body: dict[str, Any] = {"text": c.text}
            else:
                content, calls = self.answer(c)
                body = {"message": {"role": "assistant", "content": content}}
                if calls:
                    body["message"]["tool_calls"] = [call.as_openai() for call in calls]
                    finish = "tool_calls"
            out.append({"index": c.index, **body, "logprobs": lp, "finish_reason": finish})
        return {**self._head(chunk=False), "choices": out, "usage": use}

    def answer(self, c: ChoiceText) -> tuple[str | None, list[ToolCall]]:
        """(content, tool calls) of a finished chat choice; an output cut by max_tokens stays text."""
        if self.tools is None or c.finish_reason == "length":
            return c.text, []
        return self.tools.parse(c.text)

    def tool_chunk(self, index: int, calls: list[dict[str, Any]], with_usage: bool) -> dict[str, Any]:
        """A chat stream chunk whose delta carries tool-call entries (with their `index`)."""
        choice = {"index": index, "delta": {"tool_calls": calls}, "logprobs": None, "finish_reason": None}
        return {**self._head(chunk=True), "choices": [choice], **({"usage": None} if with_usage else {})}

    def chunk(self, index: int, text: str | None, finish: str | None, logprobs: dict[str, Any] | None,
              role: bool = False, with_usage: bool = False) -> dict[str, Any]:
        """One stream chunk of one choice (chat: a delta; the first one carries the role)."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        return {**self._head(chunk=True), "choices": [choice], **({"usage": None} if with_usage else {})}

    def usage_chunk(self, use: dict[str, int]) -> dict[str, Any]:
        """The last chunk with stream_options.include_usage: no choices, the usage."""
        return {**self._head(chunk=True), "choices": [], "usage": use}


def _entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}
