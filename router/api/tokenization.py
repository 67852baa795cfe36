"""How the router turns prompt text into token ids: one rule for Generate and Tokenize, off the loop.

The rule is the tokenizer's own: `tokenizer.encode(text)` with its special tokens, so a Llama-style
tokenizer (whose post-processor adds BOS) gets its BOS exactly as transformers would give it. The one
exception: a text that already starts with the BOS token is not given a second one.

A conversation is rendered with the chat template (the model's, or the router's --chat-template)
with the assistant's turn opened, and the rendered text is tokenized WITHOUT special tokens: chat
templates write BOS themselves, so adding it again would double it.

Tokenizing is CPU work that takes seconds for megabytes (validation bounds the bytes first); it runs
on a small pool of worker threads, never on the event loop, so running streams keep flowing while
a long prompt is tokenized. The Rust tokenizer releases the GIL while it works.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from jinja2 import TemplateError

from shardline.router.api.validation import ChatTurn, ValidationError

TOKENIZE_THREADS = 2


class PromptTokenizer:
    """Encodes prompt text for the router; `tokenizer` is a transformers tokenizer."""

    def __init__(self, tokenizer: Any, threads: int = TOKENIZE_THREADS, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="shardline-tokenize")
        self._bos = tokenizer.bos_token_id
        self._adds_bos = self._bos is not None and self._rule_adds_bos()

    def _rule_adds_bos(self) -> bool:
        """True when the tokenizer's special-token rule puts BOS before the text (Llama-style)."""
        with_rule = self.tokenizer.encode("a")
        return bool(with_rule) and with_rule[0] == self._bos and self.tokenizer.encode(
            "a", add_special_tokens=False)[:1] != [self._bos]

    def encode(self, text: str) -> list[int]:
        """The ids Generate uses for `text`: the tokenizer's rule, without a doubled BOS."""
        ids = list(self.tokenizer.encode(text))
        if self._adds_bos and ids[:2] == [self._bos, self._bos]:
            return ids[1:]
        return ids

    async def encode_async(self, text: str) -> list[int]:
        """`encode` on the tokenizer threads; the event loop stays free meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.encode, text)

    def render_chat(self, turns: Sequence[ChatTurn], tools: list[dict] | None = None) -> str:
        """The conversation as the model reads it, ending with the assistant's turn opened."""
        if not self.chat_template:
            raise ValidationError("messages", "this model has no chat template, so messages cannot be "
                                              "used (start the router with --chat-template FILE, or send a prompt)")
        messages = [{"role": t.role, "content": t.content} for t in turns]
        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                      add_generation_prompt=True, tools=tools)
        except TemplateError as exc:  # the template's own raise_exception("...") included
            raise ValidationError("messages", f"the chat template refused the messages: {exc}") from None

    def encode_chat(self, turns: Sequence[ChatTurn], tools: list[dict] | None = None) -> list[int]:
        """The ids Generate uses for a conversation: the rendered template (given `tools`), no
        special tokens added."""
        return list(self.tokenizer.encode(self.render_chat(turns, tools), add_special_tokens=False))

    async def encode_chat_async(self, turns: Sequence[ChatTurn], tools: list[dict] | None = None) -> list[int]:
        """`encode_chat` (template and tokenizer) on the tokenizer threads."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.encode_chat, turns, tools)

    def tokens(self, ids: Sequence[int]) -> list[str]:
        """The text of each token (the tokenizer's token strings)."""
        return self.tokenizer.convert_ids_to_tokens(list(ids))

    def close(self) -> None:
        """Stops the tokenizer threads; queued work is dropped."""
        self._pool.shutdown(wait=False, cancel_futures=True)
