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
    "gemma3_text": ("Gemma3TextConfig", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                                    "max_position_embeddings": 256, "sliding_window": 128,
                                    "layer_types": ["sliding_attention", "full_attention"]}),
    "gpt_neox": ("GPTNeoXConfig", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                   "num_attention_heads": 4, "max_position_embeddings": 256}),
}


TOKENIZER_TEXT = ("the quick brown fox jumps over the lazy dog. calibration text for a tiny model, "
                  "with numbers 0123456789 and some punctuation: (a, b); c! d? e-f.") * 20


def make_tiny_tokenizer(folder: Path) -> None:
    """A 128-token BPE tokenizer trained here (ids 0-2: <unk>, <s>, </s>), saved as tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=COMMON["vocab_size"], special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer.train_from_iterator([TOKENIZER_TEXT], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)


def make_tiny_model(arch: str, folder: Path, seed: int = 0, tokenizer: bool = True) -> Path:
    """Save a random model of family `arch` (and a tiny tokenizer) as a Hugging Face folder and return it."""
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
    if tokenizer:
        make_tiny_tokenizer(folder)
    return folder
