"""The model families shardline serves, by config.json's `model_type` and `architectures`, as names
only: the settings checks (`shard/preflight.py`) read them without importing torch or the models."""

from __future__ import annotations

# model_type -> the implementation's family (every family is served by shard/models/llama.py today)
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ARCHITECTURES = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
}
