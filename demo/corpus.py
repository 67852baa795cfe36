"""Training corpus for the shardline demo model.

The text is the interactive-help documentation that ships with CPython itself
(``pydoc_data.topics.topics``), so training and testing need no download.
Documents are returned in sorted-key order, so every call is deterministic.
"""

from __future__ import annotations

import re
from functools import lru_cache

WORD_RE = re.compile(r"[A-Za-z]+")
"""What counts as a word for :func:`corpus_words` and the readability check."""


def corpus_documents() -> list[str]:
    """Return the pydoc topic texts, one per topic, ordered by topic name."""
    from pydoc_data.topics import topics

    return [topics[key].strip() for key in sorted(topics)]


def corpus_text() -> str:
    """Return the whole corpus as one string, documents separated by a blank line."""
    return "\n\n".join(corpus_documents())


@lru_cache(maxsize=1)
def _words() -> frozenset[str]:
    return frozenset(w.lower() for w in WORD_RE.findall(corpus_text()))


def corpus_words() -> set[str]:
    """Return the set of lowercased words (``[A-Za-z]+``) occurring in the corpus."""
    return set(_words())


def real_word_fraction(text: str) -> float:
    """Fraction of the words in ``text`` that occur in the corpus (1.0 if it has none)."""
    words = [w.lower() for w in WORD_RE.findall(text)]
    if not words:
        return 1.0
    vocab = _words()
    return sum(w in vocab for w in words) / len(words)
