"""The `sft` section of a run's configuration (its flags are `megalite train`'s)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class SFTConfig:
    """Supervised fine-tuning on conversations (docs/sft.md)."""

    sft: bool = False
    """Megatron: supervised fine-tuning. --data-path names JSON-lines conversation files (OpenAI messages, ShareGPT
    conversations, or prompt/answer pairs); the loss is on the assistant's tokens only."""
    sft_messages_key: str | None = None
    """The field holding a conversation's turns; unset: 'messages' (role/content) or 'conversations' (from/value)."""
    sft_prompt_key: str = "prompt"
    """The prompt field of prompt/answer lines."""
    sft_answer_key: str = "answer"
    """The answer field of prompt/answer lines."""
    sft_system_key: str = "system"
    """An optional system-prompt field of prompt/answer lines."""
    chat_template: str | None = None
    """A Jinja chat template file (as in a tokenizer_config.json's chat_template); unset: the chat_template of the
    tokenizer_config.json beside --tokenizer-model, else megalite's built-in format (docs/sft.md)."""
    no_pack: bool = False
    """One conversation per sample, padded to --seq-length, instead of packing several into each sample."""
    sft_overlong: Literal["truncate", "drop", "error"] = "truncate"
    """A conversation longer than --seq-length + 1 tokens: cut to that length, left out, or an error naming its
    file and line. Cut and left-out conversations are counted in the log."""
