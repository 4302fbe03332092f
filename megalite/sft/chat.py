"""Chat formats: a conversation -> token ids and a loss mask that covers exactly the assistant's content and its
end-of-turn token (system and user turns and the format's scaffolding are masked).

- `TemplateFormat`: a Hugging Face chat template (Jinja, from `tokenizer_config.json` or --chat-template) rendered
  as transformers renders it (sandboxed, trim_blocks, lstrip_blocks, loop controls, `raise_exception`,
  `strftime_now`, `tojson`, the special tokens as variables), tokenized with the HF tokenizer. The assistant spans
  come from the template's `{% generation %}` blocks when it has them (transformers' assistant mask); otherwise each
  assistant turn's span is what rendering the conversation up to that turn adds to rendering it up to the turn
  before with the generation prompt, less trailing whitespace (the template must render prefixes as prefixes).
  Tokens are in a span as transformers counts them: from the token holding its first character to the token
  holding its last.
- `BuiltinFormat` (any tokenizer, megalite's byte tokenizer included): "<|system|>\\n...\\n", "<|user|>\\n...\\n",
  "<|assistant|>\\n" + content + the end-of-document token, which ends the assistant's turn.
"""
from __future__ import annotations

import datetime
import hashlib
import json
from abc import ABC, abstractmethod
from pathlib import Path

from megalite.data.tokenizers import HuggingFaceTokenizer, Tokenizer
from megalite.errors import ConfigError, DataError
from megalite.sft.config import SFTConfig
from megalite.sft.conversations import Conversation, Message

START, END = "\ue000", "\ue001"
"""Private-use characters that mark `{% generation %}` blocks in the rendered text (removed before tokenizing)."""


class ChatFormat(ABC):
    identity: str
    """Changes whenever the tokens or mask of some conversation would (keys cached datasets)."""

    @abstractmethod
    def encode(self, conversation: Conversation) -> tuple[list[int], list[int]]:
        """(token ids, loss mask of 0/1 per token) of a whole conversation."""

    @abstractmethod
    def prompt(self, messages: tuple[Message, ...]) -> list[int]:
        """Token ids of `messages` followed by the opening of an assistant turn (what generation continues)."""


class BuiltinFormat(ChatFormat):
    """megalite's own format (see the module docstring)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.identity = f"builtin/1:{tokenizer.identity}"

    def encode(self, conversation: Conversation) -> tuple[list[int], list[int]]:
        tokens: list[int] = []
        mask: list[int] = []
        for m in conversation.messages:
            header = self.tokenizer.tokenize(f"<|{m.role}|>\n")
            tokens += header
            mask += [0] * len(header)
            if m.role == "assistant":
                body = self.tokenizer.tokenize(m.content) + [self.tokenizer.eod]
                tokens += body
                mask += [1] * len(body)
            else:
                body = self.tokenizer.tokenize(m.content + "\n")
                tokens += body
                mask += [0] * len(body)
        return tokens, mask

    def prompt(self, messages: tuple[Message, ...]) -> list[int]:
        tokens = self.encode(Conversation(messages, "prompt"))[0] if messages else []
        return tokens + self.tokenizer.tokenize("<|assistant|>\n")


def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationMarks(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`: the block's output between START and END."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            return START + caller() + END

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, indent=None, ensure_ascii=False, separators=None, sort_keys=False):
        return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationMarks, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


class TemplateFormat(ChatFormat):
    """A Hugging Face chat template (see the module docstring)."""

    def __init__(self, template: str, tokenizer: HuggingFaceTokenizer, special_tokens: dict[str, str], source: str):
        self.tokenizer, self.special_tokens, self.source = tokenizer, special_tokens, source
        self.template = _environment().from_string(template)
        self.marked = "generation" in template and "endgeneration" in template
        digest = hashlib.sha256(json.dumps([template, special_tokens]).encode()).hexdigest()
        self.identity = f"template/1:{digest}:{tokenizer.identity}"

    def render(self, messages: tuple[Message, ...], add_generation_prompt: bool = False) -> str:
        """The template's text (with START/END around generation blocks)."""
        return self.template.render(messages=[{"role": m.role, "content": m.content} for m in messages],
                                    add_generation_prompt=add_generation_prompt, **self.special_tokens)

    def _spans(self, conversation: Conversation) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans of the assistant's turns in it."""
        if any(START in m.content or END in m.content for m in conversation.messages):
            raise DataError(f"{conversation.where}: the text holds the private-use characters U+E000/U+E001")
        text = self.render(conversation.messages)
        if self.marked:
            spans, plain, i = [], [], 0
            for piece in text.split(START):
                if i:
                    body, _, rest = piece.partition(END)
                    spans.append((len("".join(plain)), len("".join(plain)) + len(body)))
                    plain += [body, rest]
                else:
                    plain.append(piece)
                i += 1
            return "".join(plain), spans
        spans = []
        for i, m in enumerate(conversation.messages):
            if m.role != "assistant":
                continue
            before = self.render(conversation.messages[:i], add_generation_prompt=True)
            through = self.render(conversation.messages[: i + 1])
            if not (through.startswith(before) and text.startswith(through)):
                raise ConfigError(f"{self.source}: the chat template does not render a conversation's beginning "
                                  f"as the beginning of the whole ({conversation.where}); mark the assistant's "
                                  "text with {% generation %}...{% endgeneration %}")
            spans.append((len(before), len(through.rstrip())))
        return text, spans

    def prompt(self, messages: tuple[Message, ...]) -> list[int]:
        return self.tokenizer.tokenize(self.render(messages, add_generation_prompt=True).replace(START, "")
                                       .replace(END, ""))

    def encode(self, conversation: Conversation) -> tuple[list[int], list[int]]:
        text, spans = self._spans(conversation)
        ids, offsets = self.tokenizer.tokenize_with_offsets(text)
        mask = [0] * len(ids)
        for start, end in spans:
            inside = [t for t, (a, b) in enumerate(offsets) if b > start and a < end]
            if inside:
                for t in range(inside[0], inside[-1] + 1):
                    mask[t] = 1
        return ids, mask


def _special_tokens(config: dict) -> dict[str, str]:
    out = {}
    for key, value in config.items():
        if key.endswith("_token"):
            content = value.get("content") if isinstance(value, dict) else value
            if isinstance(content, str):
                out[key] = content
    return out


def build_chat_format(cfg: SFTConfig, tokenizer: Tokenizer, tokenizer_model: str | None) -> ChatFormat:
    """--chat-template, else the chat template beside --tokenizer-model (chat_template.jinja, or the chat_template
    of tokenizer_config.json), else the built-in format."""
    template, special, source = None, {}, None
    directory = Path(tokenizer_model).parent if tokenizer_model else None
    config_file = directory / "tokenizer_config.json" if directory else None
    if config_file is not None and config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        special = _special_tokens(config)
        template, source = config.get("chat_template"), str(config_file)
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if directory is not None and (directory / "chat_template.jinja").is_file():  # where transformers 4.43+ saves it
        template, source = (directory / "chat_template.jinja").read_text(encoding="utf-8"), str(directory)
    if cfg.chat_template:
        path = Path(cfg.chat_template)
        if not path.is_file():
            raise ConfigError(f"--chat-template {path}: no such file")
        template, source = path.read_text(encoding="utf-8"), str(path)
    if template is None:
        return BuiltinFormat(tokenizer)
    if not isinstance(tokenizer, HuggingFaceTokenizer):
        raise ConfigError(f"a chat template ({source}) needs the Hugging Face tokenizer it was written for: "
                          "--tokenizer-type HuggingFaceTokenizer --tokenizer-model PATH/tokenizer.json")
    return TemplateFormat(template, tokenizer, special, source)
