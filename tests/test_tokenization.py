"""Unit tests of the router's one tokenization rule (router/api/tokenization.py), with a tokenizer that
adds BOS like real Llama ones and one that adds nothing."""

from __future__ import annotations

import asyncio
import time

import pytest
from transformers import AutoTokenizer

from checkpoints import BOS_ID, BOS_TOKEN, CHAT_TOKENS, build_tokenizer
from shardline.demo import model_dir
from shardline.router.api.tokenization import PromptTokenizer
from shardline.router.api.validation import ChatTurn, ValidationError

TEXTS = ("The quick brown fox", "café au lait 🙂", " leading space", "日本語")


@pytest.fixture(scope="module")
def llama_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("llama-tokenizer")
    build_tokenizer(out, llama_style=True)
    return AutoTokenizer.from_pretrained(str(out))


@pytest.fixture(scope="module")
def plain_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("plain-tokenizer")
    build_tokenizer(out)
    return AutoTokenizer.from_pretrained(str(out))


def test_the_llama_style_fixture_behaves_like_a_llama_tokenizer(llama_tokenizer, plain_tokenizer) -> None:
    """BOS on encode from the post-processor, chat markers as special tokens, a chat template that
    writes BOS itself; the default fixture tokenizer is unchanged (no BOS, no template)."""
    assert llama_tokenizer("Hello").input_ids == [BOS_ID] + plain_tokenizer("Hello").input_ids
    assert llama_tokenizer.convert_tokens_to_ids(list(CHAT_TOKENS)) == [320, 321, 322]
    text = llama_tokenizer.apply_chat_template([{"role": "user", "content": " Hi "}], tokenize=False,
                                               add_generation_prompt=True)
    assert text == ("<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert plain_tokenizer.chat_template is None and len(plain_tokenizer) == 320


@pytest.mark.parametrize("text", TEXTS)
def test_encode_follows_the_tokenizers_own_rule(llama_tokenizer, plain_tokenizer, text: str) -> None:
    """Exactly what transformers gives (the ids a reference model is fed): BOS for Llama, none otherwise."""
    assert PromptTokenizer(llama_tokenizer).encode(text) == llama_tokenizer(text).input_ids
    assert PromptTokenizer(llama_tokenizer).encode(text)[:2] == [BOS_ID, llama_tokenizer(text).input_ids[1]]
    assert PromptTokenizer(plain_tokenizer).encode(text) == plain_tokenizer(text).input_ids


def test_a_prompt_that_starts_with_bos_gets_no_second_one(llama_tokenizer, plain_tokenizer) -> None:
    prompts = PromptTokenizer(llama_tokenizer)
    assert llama_tokenizer.encode(BOS_TOKEN + "Hello")[:2] == [BOS_ID, BOS_ID]  # what transformers does
    assert prompts.encode(BOS_TOKEN + "Hello") == prompts.encode("Hello") == llama_tokenizer("Hello").input_ids
    # A tokenizer that adds no BOS keeps the one the text carries.
    assert PromptTokenizer(plain_tokenizer).encode(BOS_TOKEN + "Hello") == [BOS_ID] + plain_tokenizer.encode("Hello")


class SlowTokenizer:
    """A tokenizer that takes `delay` seconds per encode without holding the GIL (as Rust's does)."""

    def __init__(self, inner, delay: float) -> None:
        self.inner, self.delay = inner, delay
        self.bos_token_id = inner.bos_token_id

    def encode(self, text: str, **kwargs) -> list[int]:
        if text.startswith("slow"):
            time.sleep(self.delay)
        return self.inner.encode(text, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


async def max_loop_gap(work, tick: float = 0.01) -> tuple[float, object]:
    """(longest gap between the loop's ticks while `work` ran, its result)."""
    gaps, last = [0.0], time.monotonic()
    task = asyncio.ensure_future(work)
    while not task.done():
        await asyncio.sleep(tick)
        now = time.monotonic()
        gaps.append(now - last)
        last = now
    return max(gaps), task.result()


def test_encode_async_keeps_the_event_loop_free(llama_tokenizer) -> None:
    prompts = PromptTokenizer(SlowTokenizer(llama_tokenizer, delay=1.0))

    async def run() -> tuple[float, list[int]]:
        return await max_loop_gap(prompts.encode_async("slow text"))

    started = time.monotonic()
    gap, ids = asyncio.run(run())
    prompts.close()
    assert time.monotonic() - started >= 1.0
    assert ids == llama_tokenizer("slow text").input_ids
    assert gap < 0.5, f"the event loop stalled for {gap:.2f}s while a prompt was tokenized"


def test_a_conversation_is_templated_with_bos_once(llama_tokenizer) -> None:
    """The template writes BOS; the rendered text is tokenized without adding another."""
    turns = [ChatTurn("system", "Be brief."), ChatTurn("user", "Hello")]
    ids = PromptTokenizer(llama_tokenizer).encode_chat(turns)
    expected = llama_tokenizer.apply_chat_template([{"role": t.role, "content": t.content} for t in turns],
                                                   tokenize=False, add_generation_prompt=True)
    assert ids == llama_tokenizer.encode(expected, add_special_tokens=False)
    assert ids[0] == BOS_ID and ids[1] != BOS_ID
    assert llama_tokenizer.decode(ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_no_chat_template_is_a_validation_error_and_a_file_replaces_it(plain_tokenizer, llama_tokenizer) -> None:
    with pytest.raises(ValidationError, match="no chat template") as info:
        PromptTokenizer(plain_tokenizer).encode_chat([ChatTurn("user", "Hi")])
    assert info.value.field == "messages"
    prompts = PromptTokenizer(plain_tokenizer, chat_template="{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert prompts.render_chat([ChatTurn("user", "Hi")]) == "[Hi]"
    refusing = PromptTokenizer(llama_tokenizer, chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValidationError, match="the chat template refused the messages: roles must alternate"):
        refusing.encode_chat([ChatTurn("user", "Hi")])


def test_the_demo_model_can_chat() -> None:
    demo = AutoTokenizer.from_pretrained(str(model_dir()))
    prompts = PromptTokenizer(demo)
    text = prompts.render_chat([ChatTurn("system", "Be helpful."), ChatTurn("user", "What is a class?")])
    assert text == "<s>Be helpful.\n\nQuestion: What is a class?\nAnswer:"
    ids = prompts.encode_chat([ChatTurn("user", "What is a class?")])
    assert ids.count(demo.bos_token_id) == 1 and ids[0] == demo.bos_token_id
