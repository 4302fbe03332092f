"""Conversation files: JSON lines in three forms, each read into a list of `Message`s.

- OpenAI: {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
- ShareGPT: {"conversations": [{"from": "system" | "human" | "gpt", "value": "..."}, ...]} ("user"/"assistant"
  are taken as roles too)
- pairs: {"prompt": "...", "answer": "...", "system": "..."} (the system prompt optional)

Keys are configurable (`SFTConfig`). A line that is not one of these, has an unknown role, a non-string content or
no assistant turn is an error naming `file:line`; blank lines are skipped.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megalite.errors import DataError
from megalite.sft.config import SFTConfig

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Conversation:
    """The turns of one line, and where it came from (for messages that name it)."""

    messages: tuple[Message, ...]
    where: str


def _turns(items: object, where: str, role_key: str, content_key: str, roles: dict[str, str]) -> list[Message]:
    if not isinstance(items, list) or not items:
        raise DataError(f"{where}: the turns must be a non-empty list")
    out = []
    for turn in items:
        if not isinstance(turn, dict):
            raise DataError(f"{where}: a turn is not an object: {turn!r:.60}")
        role, content = turn.get(role_key), turn.get(content_key)
        if role not in roles:
            raise DataError(f"{where}: unknown role {role!r} (use one of {', '.join(sorted(roles))})")
        if not isinstance(content, str):
            raise DataError(f"{where}: the {content_key!r} of a {role} turn is not a string")
        out.append(Message(roles[role], content))
    return out


def parse_conversation(record: object, where: str, cfg: SFTConfig) -> Conversation:
    """One line's conversation (see the module docstring)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: not a JSON object")
    keys = [cfg.sft_messages_key] if cfg.sft_messages_key else ["messages", "conversations"]
    key = next((k for k in keys if k in record), None)
    if key is not None:
        items = record[key]
        sharegpt = isinstance(items, list) and items and isinstance(items[0], dict) and "from" in items[0]
        messages = (_turns(items, where, "from", "value", SHAREGPT_ROLES) if sharegpt else
                    _turns(items, where, "role", "content", {r: r for r in ROLES}))
    elif cfg.sft_prompt_key in record or cfg.sft_answer_key in record:
        prompt, answer = record.get(cfg.sft_prompt_key), record.get(cfg.sft_answer_key)
        system = record.get(cfg.sft_system_key)
        if not isinstance(prompt, str) or not isinstance(answer, str) or not isinstance(system, (str, type(None))):
            raise DataError(f"{where}: {cfg.sft_prompt_key!r} and {cfg.sft_answer_key!r} (and "
                            f"{cfg.sft_system_key!r} if given) must be strings")
        messages = ([Message("system", system)] if system else []) + [Message("user", prompt),
                                                                       Message("assistant", answer)]
    else:
        raise DataError(f"{where}: no conversation: expected a {' or '.join(map(repr, keys))} list, or "
                        f"{cfg.sft_prompt_key!r}/{cfg.sft_answer_key!r} fields (set --sft-messages-key, "
                        "--sft-prompt-key, --sft-answer-key)")
    if not any(m.role == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing to learn from")
    return Conversation(tuple(messages), where)


def read_conversations(path: str, cfg: SFTConfig) -> list[Conversation]:
    """Every conversation of a JSON-lines file, in file order."""
    file = Path(path)
    out = []
    for number, raw in enumerate(file.read_bytes().splitlines(), 1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not UTF-8 (byte {e.start})") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not JSON ({e.msg})") from None
        out.append(parse_conversation(record, where, cfg))
    if not out:
        raise DataError(f"--data-path {path}: no conversations in the file")
    return out
