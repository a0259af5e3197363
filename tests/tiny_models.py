"""Tiny random causal LMs built from a config in the test itself: no weights are fetched from anywhere."""

from __future__ import annotations

from pathlib import Path

COMMON = {"vocab_size": 128, "bos_token_id": 1, "eos_token_id": 2}

# One small config per supported family; sizes keep the export of each under ~15 s on 2 cores.
TINY_CONFIGS = {
    "llama": ("LlamaConfig", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}),
    "mistral": ("MistralConfig", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "num_key_value_heads": 2,
                                  "max_position_embeddings": 256, "sliding_window": None}),
    "qwen2": ("Qwen2Config", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}),
    "qwen3": ("Qwen3Config", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                              "max_position_embeddings": 256}),
    "gpt2": ("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256}),
    "phi3": ("Phi3Config", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
                            "pad_token_id": 0}),
    "gpt_neox": ("GPTNeoXConfig", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                   "num_attention_heads": 4, "max_position_embeddings": 256}),
}


def make_tiny_model(arch: str, folder: Path, seed: int = 0) -> Path:
    """Save a random model of family `arch` as a Hugging Face folder and return it."""
    import torch
    import transformers

    class_name, kwargs = TINY_CONFIGS[arch]
    config = getattr(transformers, class_name)(**COMMON, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    # Random init gives near-uniform logits, where greedy ties flip on rounding noise; wider weights make
    # the distribution peaked enough for a token-for-token comparison to be meaningful.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.15)
    model.save_pretrained(folder)
    return folder
