"""The OpenAI-compatible HTTP API of the router (same process, same event loop, same batcher)."""
