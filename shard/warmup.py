"""The worst-case steps Warmup runs before the KV pool is sized.

A one-sequence decode (the batch-1 shape a compiled stack specialises on), then a decode-shaped
step of the largest batch at the longest context the router admits (each sequence starts with a
cached prefix of that length, so attention reads a full context; within the KV budget the router
gave), half of them sampled with a temperature so the full sampling path runs, then a prefill of
the largest step (sequences no longer than the model allows). All run on a scratch pool just big
enough for them, so the peak memory of a real step is known before the pool takes the rest, and
a compiled stack has seen every shape kind before the first request.
"""

from __future__ import annotations

from shardline.proto import shard_pb2

WARMUP_ID_BASE = 2**62


def decode_context(max_batch_size: int, max_positions: int, max_context_tokens: int, max_kv_tokens: int) -> int:
    """Tokens each sequence of the largest decode batch holds: the longest admitted sequence, as
    far as the model and the KV budget (shared by the whole batch) allow."""
    context = min(max_positions, max_context_tokens or max_positions) - 1
    if max_kv_tokens:
        context = min(context, max_kv_tokens // max(1, max_batch_size) - 1)
    return max(1, context)


def warmup_steps(max_step_tokens: int, max_batch_size: int, block_size: int, max_positions: int,
                 max_context_tokens: int = 0, max_kv_tokens: int = 0) -> tuple[list[shard_pb2.StepRequest], int]:
    """(the steps to run, the blocks of scratch pool they need)."""
    next_block = 0

    def blocks(n_tokens: int) -> list[int]:
        nonlocal next_block
        count = -(-n_tokens // block_size)
        next_block += count
        return list(range(next_block - count, next_block))

    def start(i: int, hot: bool, cached: int = 0) -> shard_pb2.NewSequence:
        sampling = shard_pb2.SamplingParameters(temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.1) \
            if hot else shard_pb2.SamplingParameters()
        return shard_pb2.NewSequence(id=WARMUP_ID_BASE + i, sampling=sampling, prompt_len=cached + 1,
                                     cached_token_ids=[2 + j % 7 for j in range(cached)])

    solo_id = max(1, max_batch_size) + max_step_tokens + 1
    solo = shard_pb2.StepRequest(start=[start(solo_id, False)], work=[shard_pb2.Work(
        id=WARMUP_ID_BASE + solo_id, token_ids=[2], new_blocks=blocks(1), sample=True)])
    context = decode_context(max_batch_size, max_positions, max_context_tokens, max_kv_tokens)
    decode_ids = range(max(1, max_batch_size))
    decode = shard_pb2.StepRequest(
        free=[WARMUP_ID_BASE + solo_id], start=[start(i, i % 2 == 1, context) for i in decode_ids],
        work=[shard_pb2.Work(id=WARMUP_ID_BASE + i, token_ids=[2 + i % 7], new_blocks=blocks(context + 1),
                             sample=True) for i in decode_ids])
    per_seq = max(2, min(max_step_tokens, max_positions - 1))
    lengths = [per_seq] * (max_step_tokens // per_seq) + [max_step_tokens % per_seq]
    first = len(decode_ids)
    prefill = shard_pb2.StepRequest(free=[WARMUP_ID_BASE + i for i in decode_ids])
    for i, n in enumerate(x for x in lengths if x > 1):
        prefill.start.append(start(first + i, i == 0))
        prefill.work.append(shard_pb2.Work(id=WARMUP_ID_BASE + first + i, token_ids=[2 + j % 7 for j in range(n)],
                                           new_blocks=blocks(n), sample=True))
    return [solo, decode, prefill], next_block
