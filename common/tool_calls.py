"""Tool calling, as OpenAI defines it: what `tools` + `tool_choice` ask of the output, and how the
output is answered. Shared by the OpenAI-compatible API (router/api/openai) and the SDK's `chat`.

- `none` (the default without tools): the tools are not shown to the model, the answer is text.
- a named function (`{"type": "function", "function": {"name": ...}}`): the output is constrained
  to that function's parameters schema and answered as one `tool_calls` entry.
- `required`: the output is constrained to a JSON array of at least one (exactly one with
  `parallel_tool_calls: false`) `{"name": <a tool>, "parameters": {...}}`, each valid under its
  tool's schema, and answered as that many `tool_calls`.
- `auto` (the default with tools): the tools go to the chat template and the model decides; the
  answer parses the Hermes/Qwen format (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
  as the templates of Qwen 2.5/3, Hermes and Mistral-style models write it) and a whole output that
  is one JSON object `{"name": <a tool>, "parameters"|"arguments": {...}}` (Llama 3.1/3.2's JSON
  tool format). Anything else is text.
A forced call ends with `finish_reason: "tool_calls"` (unless cut by max_tokens: "length").
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any



class BadField(ValueError):
    """A tools / tool_choice value that cannot be used: `param` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text

    def as_openai(self, index: int | None = None) -> dict[str, Any]:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class ToolPlan:
    """The tools of a chat request and its tool_choice: mode none, auto, required or named."""

    tools: tuple[dict[str, Any], ...]
    mode: str
    name: str = ""  # the named function
    parallel: bool = True

    @classmethod
    def of(cls, tools: list[Any] | None, choice: Any, parallel: bool | None) -> "ToolPlan | None":
        """The plan of a body's tools/tool_choice (None: no tools in play); raises BadField."""
        tools = list(tools or [])
        for i, tool in enumerate(tools):
            function = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict) \
                    or not isinstance(function.get("name"), str) or not function["name"]:
                raise BadField("tools", f'tools[{i}] must be {{"type": "function", "function": {{"name": ...}}}}')
            if not isinstance(function.get("parameters", {}), dict):
                raise BadField("tools", f"tools[{i}].function.parameters must be a JSON schema object")
        names = [t["function"]["name"] for t in tools]
        if choice is None:
            choice = "auto" if tools else "none"
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
            if not isinstance(name, str):
                raise BadField("tool_choice", 'tool_choice must be "none", "auto", "required" or '
                                              '{"type": "function", "function": {"name": ...}}')
            if name not in names:
                raise BadField("tool_choice", f"tool_choice names the function {name!r}, which is not in tools")
            return cls(tuple(tools), "named", name, parallel is not False)
        if choice not in ("none", "auto", "required"):
            raise BadField("tool_choice", f'tool_choice must be "none", "auto", "required" or a named function, '
                                          f'got {choice!r}')
        if choice != "none" and not tools:
            raise BadField("tool_choice", f'tool_choice "{choice}" needs tools')
        if choice == "none":
            return None
        return cls(tuple(tools), choice, "", parallel is not False)

    def _schema(self, name: str) -> dict[str, Any]:
        function = next(t["function"] for t in self.tools if t["function"]["name"] == name)
        return function.get("parameters") or {"type": "object"}

    def constraint(self) -> dict[str, Any] | None:
        """The JSON schema the output must follow (None for auto)."""
        if self.mode == "named":
            return self._schema(self.name)
        if self.mode == "required":
            one = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                     "parameters": self._schema(t["function"]["name"])},
                    "required": ["name", "parameters"], "additionalProperties": False} for t in self.tools]
            return {"type": "array", "items": {"anyOf": one}, "minItems": 1,
                    **({} if self.parallel else {"maxItems": 1})}
        return None

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, tool calls) of a finished output."""
        if self.mode == "named":
            return None, [ToolCall(call_id(), self.name, text)]
        if self.mode == "required":
            try:
                items = json.loads(text)
            except json.JSONDecodeError:
                return text, []  # cut by max_tokens: no complete call
            return None, [ToolCall(call_id(), i["name"], json.dumps(i["parameters"], ensure_ascii=False))
                          for i in items]
        return self._parse_auto(text)

    def _parse_auto(self, text: str) -> tuple[str | None, list[ToolCall]]:
        names = {t["function"]["name"] for t in self.tools}
        calls = [c for c in (self._call(m.group(1), names) for m in _HERMES.finditer(text)) if c is not None]
        if calls:
            content = text[:text.index("<tool_call>")].strip()
            return content or None, calls
        whole = self._call(text.strip(), names)
        if whole is not None:
            return None, [whole]
        return text, []

    @staticmethod
    def _call(body: str, names: set[str]) -> ToolCall | None:
        try:
            item = json.loads(body)
        except json.JSONDecodeError:
            return None
        if not isinstance(item, dict) or item.get("name") not in names:
            return None
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):
            return ToolCall(call_id(), item["name"], args)
        return ToolCall(call_id(), item["name"], json.dumps(args, ensure_ascii=False))
