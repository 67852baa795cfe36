"""Incremental detokenization of one request's generated tokens, with stop-string matching.

Owns the rule that the text deltas streamed to a client always concatenate to
`tokenizer.decode(all generated ids, skip_special_tokens=True)`, computed in time bounded by a
small window of recent tokens rather than by the whole sequence. The common case runs in Rust,
in `tokenizers.decoders.DecodeStream` (one call per token); this module keeps the same window
offsets beside it and takes over in Python for the rare cases the stream does not bound:

* `prefix_offset..read_offset` are the tokens whose text was released last step; they are decoded
  again only as context, so decoders that depend on neighbours (a leading space stripped from the
  first token, byte-level merges) give the same text as a full decode.
* tokens after `read_offset` are held while their text ends with U+FFFD, i.e. while a multi-byte
  UTF-8 character is still incomplete.
* special tokens (eos, ...) never enter the window: skipping them before decoding is what
  `skip_special_tokens=True` does too, so the text is the same and the window stays small.
* garbage that never completes a character (a model repeating one lead byte) would grow the held
  window without bound (DecodeStream holds it all and decodes it again every step); past
  `_MAX_HELD_TOKENS` the request leaves the stream for the Python window, which is cut at the latest
  token boundary where decoding both halves separately gives the same text (exact for byte-level
  decoders). A window whose text does not extend its prefix, which DecodeStream refuses with an
  error, takes the same way out.

Released text then passes through the stop matcher, which holds back any suffix that could still
become a stop string and ends the output right before the first stop string that appears.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenizers.decoders import DecodeStream

_REPLACEMENT = "\ufffd"
_MAX_HELD_TOKENS = 8


class IncrementalDetokenizer:
    """Turns generated token ids, one at a time, into the text deltas that are safe to stream.

    `tokenizer` is a `transformers` fast tokenizer or a bare `tokenizers.Tokenizer`; decoding uses
    the Rust tokenizer with special tokens skipped and no clean-up of tokenization spaces.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        self._special = {i for i, t in self._backend.get_added_tokens_decoder().items() if t.special}
        self._stop = tuple(stop)
        self._stream: DecodeStream | None = DecodeStream(skip_special_tokens=True)
        self._ids: list[int] = []
        self._text_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._prefix_text = ""
        self._pending = ""
        self._chunks: list[str] = []
        self._stopped = False

    @property
    def text(self) -> str:
        """The text emitted so far (the concatenation of every returned delta)."""
        return "".join(self._chunks)

    @property
    def stopped(self) -> bool:
        """True once a stop string appeared; the text ends right before it."""
        return self._stopped

    @property
    def token_ids(self) -> tuple[int, ...]:
        """Every id pushed until the output stopped (the one that completed a stop string included)."""
        return tuple(self._ids)

    def token_text(self, token_id: int) -> str:
        """One token's own text, decoded alone (for log-probability listings, not for streaming)."""
        return self._backend.decode([token_id], skip_special_tokens=False)

    def push(self, token_id: int) -> str:
        """Adds one generated token; returns the text it makes safe to emit (possibly "")."""
        if self._stopped:
            return ""
        self._ids.append(token_id)
        if token_id in self._special:
            return ""
        self._text_ids.append(token_id)
        return self._release(self._stream_step(token_id) if self._stream is not None else self._decode_step())

    def finish(self) -> str:
        """Flushes the held text at the end of generation (incomplete characters included)."""
        if self._stopped:
            return ""
        delta = ""
        if self._read_offset < len(self._text_ids):
            self._leave_stream()
            window = self._decode(self._prefix_offset, len(self._text_ids))
            delta = self._advance(window, len(self._text_ids))
        return self._release(delta, final=True)

    def _stream_step(self, token_id: int) -> str:
        """DecodeStream's step, with the window offsets it moves mirrored here (its rule is ours:
        a release moves the prefix to the last read offset and the read offset to the end)."""
        try:
            text = self._stream.step(self._backend, token_id)
        except Exception:  # tokenizers raises a bare Exception for a window that drops its prefix
            self._leave_stream()
            return self._decode_step()
        if text is not None:
            self._prefix_offset, self._read_offset = self._read_offset, len(self._text_ids)
            return text
        if len(self._text_ids) - self._read_offset > _MAX_HELD_TOKENS:
            self._leave_stream()
            return self._decode_step()
        return ""

    def _leave_stream(self) -> None:
        """Hands the window to the Python path, for the rest of this request."""
        if self._stream is not None:
            self._stream = None
            self._prefix_text = self._decode(self._prefix_offset, self._read_offset)

    def _decode(self, start: int, stop: int) -> str:
        return self._backend.decode(self._text_ids[start:stop], skip_special_tokens=True)

    def _decode_step(self) -> str:
        """Decodes the window; returns the new complete text, advancing the window past it."""
        end = len(self._text_ids)
        window = self._decode(self._prefix_offset, end)
        if len(window) > len(self._prefix_text) and not window.endswith(_REPLACEMENT):
            return self._advance(window, end)
        if end - self._read_offset > _MAX_HELD_TOKENS:
            return self._cut_long_hold(window)
        return ""

    def _cut_long_hold(self, window: str) -> str:
        """Releases the text of held tokens up to the latest boundary that decodes separably."""
        end = len(self._text_ids)
        for cut in range(end - 1, self._read_offset, -1):
            head = self._decode(self._prefix_offset, cut)
            if len(head) > len(self._prefix_text) and head + self._decode(cut, end) == window:
                return self._advance(head, cut)
        return ""

    def _advance(self, window_to_cut: str, cut: int) -> str:
        """Moves the window so that tokens up to `cut` are released; returns their new text."""
        delta = window_to_cut[len(self._prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, cut
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        return delta

    def _release(self, delta: str, final: bool = False) -> str:
        """Passes decoded text through the stop matcher; returns what may be emitted now."""
        pending = self._pending + delta
        stop_at = self._first_stop(pending)
        if stop_at is not None:
            self._stopped = True
            out, self._pending = pending[:stop_at], ""
        else:
            keep = 0 if final else self._stop_prefix_length(pending)
            out, self._pending = pending[: len(pending) - keep], pending[len(pending) - keep:]
        if out:
            self._chunks.append(out)
        return out

    def _first_stop(self, text: str) -> int | None:
        """Index of the earliest stop string in `text`, or None."""
        found = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        return min(found, default=None)

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        longest = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest
