"""Router configuration: limits, batching knobs and where the shards are. Frozen, built once."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from shardline.router.api.security_config import SecurityConfig


DEFAULT_CPU_STEP_TOKENS = 256
DEFAULT_GPU_STEP_TOKENS = 2048


@dataclass(frozen=True)
class RouterConfig:
    model: Path
    host: str = "0.0.0.0"
    port: int = 8500
    max_concurrent_requests: int = 128
    max_input_tokens: int = 1024
    # Longest text prompt in UTF-8 bytes, refused before tokenizing; 0 = 32 x max_input_tokens.
    max_request_bytes: int = 0
    max_total_tokens: int = 2048
    # Token budget of one step (decodes + prompt chunks); 0 = by the shards' device (step_tokens).
    max_batch_prefill_tokens: int = 0
    # KV tokens the batcher may keep in flight; 0 = the capacity the shards report at Warmup
    # (on CPU shards capped at what can run at once: kv_tokens_cap).
    max_batch_total_tokens: int = 0
    max_batch_size: int = 256
    # Keep computed KV blocks and reuse them for requests that share a prefix.
    prefix_cache: bool = True
    # Speculative decoding: "off", or "ngram" (the router proposes tokens from the request's own
    # prompt + output, router/scheduling/speculation.py).
    speculative: str = "off"
    num_speculative_tokens: int = 4  # most proposals per request per step
    ngram_min: int = 2  # shortest and longest suffix matched against the earlier tokens
    ngram_max: int = 4
    # Speculate only while at most this many requests decode (a larger batch is compute-bound).
    speculative_max_batch: int = 8
    # Structured output: seconds one constraint may take to compile, and its largest source text.
    grammar_timeout: float = 5.0
    max_grammar_bytes: int = 65536
    max_stop_sequences: int = 8
    default_max_new_tokens: int = 64
    # Seconds one router->shard step may take before the group counts as hung.
    step_timeout: float = 60.0
    # Seconds to wait for the shards to load and warm up.
    startup_timeout: float = 600.0
    # Seconds running streams get to finish on SIGTERM.
    shutdown_grace: float = 30.0
    # Port of the OpenAI-compatible HTTP API (same process, same batcher); 0 turns it off.
    http_port: int = 8000
    # The model id of the HTTP API (/v1/models, the "model" field); "" = the model folder's name.
    served_model_name: str = ""
    # A Jinja chat template file used instead of the tokenizer's own (None: the tokenizer's).
    chat_template: Path | None = None
    # TLS, API keys, tenants' limits and request size limits (router/api/security_config.py).
    security: SecurityConfig = field(default_factory=SecurityConfig)

    def step_tokens(self, device: str) -> int:
        """The step's token budget: --max-batch-prefill-tokens, or by default 256 on CPU shards and
        2048 on GPU shards. A chunk that size already keeps the device busy, and a running stream
        waits at most one chunk between two tokens while a long prompt is prefilled."""
        if self.max_batch_prefill_tokens:
            return self.max_batch_prefill_tokens
        return DEFAULT_GPU_STEP_TOKENS if device.startswith("cuda") else DEFAULT_CPU_STEP_TOKENS

    def kv_tokens_cap(self, device: str) -> int:
        """Most KV tokens the shards' pools may hold (0: no cap): --max-batch-total-tokens, or by
        default on CPU shards what the router can ever have running at once, min(--max-batch-size,
        --max-concurrent-requests) x --max-total-tokens, so that a small model does not take
        --kv-memory-fraction of the host's RAM. GPU shards fill --kv-memory-fraction of free memory."""
        if self.max_batch_total_tokens:
            return self.max_batch_total_tokens
        if device.startswith("cuda"):
            return 0
        return min(self.max_batch_size, self.max_concurrent_requests) * self.max_total_tokens

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model.name

    def validate(self) -> None:
        if self.max_input_tokens >= self.max_total_tokens:
            raise ValueError(f"--max-input-tokens ({self.max_input_tokens}) must be smaller than "
                             f"--max-total-tokens ({self.max_total_tokens})")
        if self.max_batch_prefill_tokens < 0:
            raise ValueError(f"--max-batch-prefill-tokens must be >= 0, got {self.max_batch_prefill_tokens}")
        if self.max_batch_total_tokens and self.max_batch_total_tokens < self.max_total_tokens:
            raise ValueError(f"--max-batch-total-tokens ({self.max_batch_total_tokens}) must be at least "
                             f"--max-total-tokens ({self.max_total_tokens})")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"--ngram-min ({self.ngram_min}) must be >= 1 and at most --ngram-max ({self.ngram_max})")
        if self.max_concurrent_requests < 1:
            raise ValueError(f"--max-concurrent-requests must be >= 1, got {self.max_concurrent_requests}")
        self.security.validate()

    def fit_to_model(self, max_positions: int | None) -> RouterConfig:
        """This config with --max-total-tokens (and --max-input-tokens below it) cut down to the
        model's max_position_embeddings: the shards refuse longer requests, which must therefore be
        refused by validation instead of reaching them."""
        if not max_positions or self.max_total_tokens <= max_positions:
            return self
        return replace(self, max_total_tokens=max_positions,
                       max_input_tokens=min(self.max_input_tokens, max_positions - 1))
