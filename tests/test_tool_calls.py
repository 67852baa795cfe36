"""Tool calls: the formats `auto` parses from a model's text, the schemas forced calls are held to,
and the tools reaching the chat template."""

from __future__ import annotations

import json

import jsonschema
import pytest

from shardline.common.tool_calls import BadField, ToolPlan
from shardline.router.api.tokenization import PromptTokenizer
from shardline.router.api.validation import ChatTurn

ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
NOW = {"type": "function", "function": {"name": "now"}}


def auto() -> ToolPlan:
    return ToolPlan.of([ADD, NOW], "auto", None)


def test_hermes_tool_call_blocks_are_parsed_with_the_text_before_them():
    text = ('Let me add. <tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
            '<tool_call>{"name": "now", "arguments": {}}</tool_call>')
    content, calls = auto().parse(text)
    assert content == "Let me add."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("add", {"a": 1, "b": 2}), ("now", {})]
    assert len({c.id for c in calls}) == 2


def test_llama_json_tool_call_is_parsed():
    content, calls = auto().parse(' {"name": "add", "parameters": {"a": 3, "b": 4}}')
    assert content is None and calls[0].name == "add" and json.loads(calls[0].arguments) == {"a": 3, "b": 4}


@pytest.mark.parametrize("text", ["Just text.", '{"name": "unknown", "parameters": {}}', "<tool_call>not json</tool_call>",
                                  '{"a": 1}'])
def test_anything_else_is_text(text):
    assert auto().parse(text) == (text, [])


def test_required_schema_holds_every_tool_and_parallel_false_allows_one():
    schema = ToolPlan.of([ADD, NOW], "required", False).constraint()
    jsonschema.validate([{"name": "add", "parameters": {"a": 1, "b": 2}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "add", "parameters": {"a": 1}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "now", "parameters": {}}] * 2, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([], schema)


def test_named_schema_is_the_functions_parameters():
    plan = ToolPlan.of([ADD, NOW], {"type": "function", "function": {"name": "add"}}, None)
    assert plan.constraint() == ADD["function"]["parameters"]
    assert ToolPlan.of([ADD, NOW], {"type": "function", "function": {"name": "now"}}, None).constraint() == {
        "type": "object"}


@pytest.mark.parametrize("tools, choice, says", [
    ([ADD], {"type": "function", "function": {"name": "sub"}}, "not in tools"),
    ([], "required", "needs tools"),
    ([{"type": "function"}], "auto", r"tools\[0\]"),
    ([ADD], "sometimes", "tool_choice must be"),
])
def test_bad_tools_are_refused(tools, choice, says):
    with pytest.raises(BadField, match=says):
        ToolPlan.of(tools, choice, None)


def test_none_means_no_tools_in_play():
    assert ToolPlan.of([ADD], "none", None) is None and ToolPlan.of(None, None, None) is None


def test_tools_reach_the_chat_template(checkpoint_factory):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_factory(arch="llama", num_layers=1)))
    template = "{% for t in tools or [] %}[{{ t.function.name }}]{% endfor %}{{ messages[-1].content }}"
    prompts = PromptTokenizer(tokenizer, chat_template=template)
    assert prompts.render_chat([ChatTurn("user", "Hi")], [ADD, NOW]) == "[add][now]Hi"
    assert prompts.render_chat([ChatTurn("user", "Hi")]) == "Hi"
