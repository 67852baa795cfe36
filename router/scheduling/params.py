"""What the scheduler is given for one request: its prompt's token ids and sampling parameters,
checked by the API's validation (`router/api/validation.py`) with every default filled in."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ValidRequest:
    """A request that passed validation, with every default filled in."""

    prompt_token_ids: tuple[int, ...]
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    seed: int | None
    stop: tuple[str, ...]
    ignore_eos: bool
    logprobs: bool
    priority: int
    top_logprobs: int = 0
    speculative: bool = True  # False: the client opted out of speculative decoding
    grammar: str = ""  # structured output: the compiled llguidance grammar ("" = free text)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)
