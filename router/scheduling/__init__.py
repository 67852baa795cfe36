"""Scheduling: the queue, KV blocks, prefix cache, scheduler, batcher and one request's state."""
