"""The request bodies of the OpenAI-compatible API, as pydantic models.

Only the types live here; ranges and lengths are the router's own validation (the same rules and
messages as gRPC). Unknown fields are refused (extra="forbid") so that nothing a client asks for is
silently ignored; fields shardline does not implement are accepted only at their neutral value
(`NEUTRAL`), which changes nothing, and `user` is accepted and ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Fields of the OpenAI API that shardline does not implement, with the values that mean "off".
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "min_tokens": (None, 0),
}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StructuredOutputs(_Body):
    """Extra body `structured_outputs` (vLLM's names): exactly one of them."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    schema_: dict[str, Any] | bool | str | None = Field(None, alias="json")  # a schema (or its text); true: any object
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # Lark, or GBNF


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Fields common to completions and chat completions (plus the peers' usual extra-body ones)."""

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    speculative: bool = True  # extra body: false opts out of --speculative decoding
    user: str | None = None  # harmless: accepted and ignored
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    min_tokens: int | None = None
    # structured output: OpenAI's response_format (text, json_object, json_schema) and the extra body
    response_format: dict[str, Any] | None = None
    structured_outputs: StructuredOutputs | None = None


class CompletionBody(_Sampling):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None
    logprobs: int | None = None
    best_of: int | None = None
    echo: bool | None = None
    suffix: str | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatBody(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
