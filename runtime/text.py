"""Text in, text out without torch: the artifact's tokenizer.json through `tokenizers`, and the model's chat
template rendered with jinja2."""

from __future__ import annotations

import json
from dataclasses import dataclass

from runtime import artifact as artifacts
from runtime.errors import BadInputError

TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"


@dataclass
class TextCodec:
    tokenizer: object  # tokenizers.Tokenizer
    chat_template: str | None
    special_tokens: dict[str, str]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for a conversation, as the model was trained to see it."""
        if not self.chat_template:
            raise BadInputError("this model has no chat template; pass plain text (without --chat)")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        # A sandbox: templates come with downloaded models and must not reach Python internals.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens)


def _raise_template_error(message: str):
    raise BadInputError(f"the chat template rejected the conversation: {message}")


def load_codec(art: artifacts.Artifact) -> TextCodec:
    from tokenizers import Tokenizer

    files = art.manifest["files"]
    if "tokenizer.json" not in files:
        raise BadInputError(f"artifact {art.path} has no tokenizer.json; pass token ids, or export a model that "
                            "ships a fast tokenizer")
    tokenizer = Tokenizer.from_file(str(art.file("tokenizer.json")))
    config = json.loads(art.file(CONFIG_FILE).read_text()) if CONFIG_FILE in files else {}
    template = art.file(TEMPLATE_FILE).read_text() if TEMPLATE_FILE in files else config.get("chat_template")
    special = {key: _token_text(config[key]) for key in ("bos_token", "eos_token", "pad_token", "unk_token")
               if config.get(key)}
    return TextCodec(tokenizer, template, special)


def _token_text(token) -> str:
    return token["content"] if isinstance(token, dict) else str(token)
