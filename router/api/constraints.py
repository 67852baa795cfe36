"""Structured-output constraints, compiled and checked before a request reaches the shards.

A `Constraint` (JSON schema, any JSON object, regex, choice, Lark/GBNF grammar) becomes one
llguidance grammar, the serialized form the shards' sampling rank builds its matcher from
(shard/constraints.py). Compiling means building a matcher over the served tokenizer and computing
its first mask, so every error llguidance can find up front (a bad schema, regex or grammar, a
grammar past llguidance's size limits) is refused here as INVALID_ARGUMENT naming the problem.

Compiling runs on its own worker threads (llguidance drops the GIL while it builds) under a time
bound (--grammar-timeout) and a size bound (--max-grammar-bytes), so a grammar built to be slow is
refused within the bound and never touches the step loop. Compiled grammars are cached by their
text, so a repeated schema costs a dictionary lookup. Metrics: compile time and cache lookups.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import CollectorRegistry, Counter, Histogram

from shardline.proto import serving_pb2
from shardline.router.api.validation import ValidationError

COMPILE_THREADS = 2
CACHED = 256  # compiled grammars kept (least recently used dropped first)
COMPILE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class ConstraintMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.compile = Histogram("shardline_grammar_compile_seconds", "Time to compile and check a structured-"
                                 "output constraint (cache misses only)", buckets=COMPILE_BUCKETS, registry=registry)
        self.lookups = Counter("shardline_grammar_cache_lookups", "Structured-output constraints looked up in the "
                               "compiled-grammar cache, by result (hit, miss, refused)", ["result"], registry=registry)


def source(constraint: serving_pb2.Constraint) -> tuple[str, str] | None:
    """(kind, text) of a request's constraint: the llguidance format and its source text; None when unset."""
    kind = constraint.WhichOneof("kind")
    if kind is None or (kind == "json_object" and not constraint.json_object):
        return None
    if kind == "json_object":
        return "json_schema", '{"type": "object"}'
    if kind == "choice":
        choices = list(constraint.choice.choices)
        if not choices:
            raise ValidationError("constraint.choice", "constraint.choice needs at least one string")
        if any(not c for c in choices):
            raise ValidationError("constraint.choice", "constraint.choice has an empty string")
        return "choice", json.dumps(choices)
    return kind, getattr(constraint, kind)


class ConstraintCompiler:
    """Compiles constraints for one served tokenizer (a transformers tokenizer of `vocab_size` ids)."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: frozenset[int] | None, registry: CollectorRegistry,
                 timeout: float = 5.0, max_bytes: int = 65536) -> None:
        self.timeout, self.max_bytes = timeout, max_bytes
        self.metrics = ConstraintMetrics(registry)
        self._pool = ThreadPoolExecutor(max_workers=COMPILE_THREADS, thread_name_prefix="shardline-grammar")
        self._tokenizer = self._pool.submit(_llg_tokenizer, tokenizer, vocab_size, eos_ids)
        self._cache: OrderedDict[tuple[str, str], str] = OrderedDict()

    async def compile(self, constraint: serving_pb2.Constraint) -> str:
        """The llguidance grammar of `constraint` ("" when unset); raises ValidationError."""
        src = source(constraint)
        if src is None:
            return ""
        kind, text = src
        field = f"constraint.{constraint.WhichOneof('kind')}"
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > self.max_bytes:
            raise ValidationError(field, f"{field} has {size} bytes, more than --max-grammar-bytes={self.max_bytes}")
        cached = self._cache.get(src)
        if cached is not None:
            self._cache.move_to_end(src)
            self.metrics.lookups.labels("hit").inc()
            return cached
        start = time.perf_counter()
        future = asyncio.get_running_loop().run_in_executor(self._pool, self._build, kind, text)
        try:
            grammar, error = await asyncio.wait_for(future, self.timeout)
        except asyncio.TimeoutError:
            self.metrics.lookups.labels("refused").inc()
            raise ValidationError(field, f"{field} took longer than --grammar-timeout={self.timeout:g}s "
                                         f"to compile") from None
        if error:
            self.metrics.lookups.labels("refused").inc()
            raise ValidationError(field, f"{field} is invalid: {error}")
        self.metrics.compile.observe(time.perf_counter() - start)
        self.metrics.lookups.labels("miss").inc()
        self._cache[src] = grammar
        if len(self._cache) > CACHED:
            self._cache.popitem(last=False)
        return grammar

    def _build(self, kind: str, text: str) -> tuple[str, str]:
        """(grammar, "") or ("", the error), on a worker thread."""
        import llguidance

        tokenizer = self._tokenizer.result()
        if tokenizer is None:
            return "", "this server cannot apply structured output (llguidance could not load the tokenizer)"
        if kind == "json_schema":
            try:
                schema = json.loads(text)
            except json.JSONDecodeError as exc:
                return "", f"not JSON ({exc})"
            if not isinstance(schema, (dict, bool)):
                return "", f"a JSON schema is an object or a boolean, got {type(schema).__name__}"
        try:
            grammar = grammar_of(kind, text)
        except ValueError as exc:
            return "", str(exc)
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if not matcher.is_error():
            matcher.compute_bitmask()  # the first mask: a lexer that cannot start fails here, not mid-request
        if matcher.is_error():
            return "", matcher.get_error().split("<state>")[0].strip()  # the parser dump is for llguidance's authors
        return grammar, ""

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def grammar_of(kind: str, text: str) -> str:
    """The llguidance grammar of a constraint's source (raises ValueError when it cannot be read).
    JSON is compact (no optional whitespace between tokens), as the peers default to: a model
    that wanders into whitespace never ends its object otherwise."""
    import llguidance

    if kind == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(text, defaults={"whitespace_flexible": False})
    return llguidance.grammar_from(kind, text)


def _llg_tokenizer(tokenizer, vocab_size: int, eos_ids: frozenset[int] | None):
    try:
        import llguidance.hf
        return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size,
                                            eos_token=sorted(eos_ids) if eos_ids else None)
    except Exception:  # noqa: BLE001 - reported per request: "cannot apply structured output"
        return None
