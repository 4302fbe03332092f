"""SFT data: the three conversation forms and their errors (file:line); a Qwen-style chat template rendered and
masked exactly as transformers' `apply_chat_template(..., return_assistant_tokens_mask=True)` does, and the same mask
from the template without {% generation %} marks; the built-in format; best-fit-decreasing packing; and the fields of
a packed sample (no loss across conversations, positions and documents restarting)."""
import json
import re

import numpy as np
import pytest
import torch

from megalite.arguments import parse_args
from megalite.data.tokenizers import ByteTokenizer, HuggingFaceTokenizer
from megalite.errors import DataError
from megalite.sft.chat import BuiltinFormat, build_chat_format
from megalite.sft.config import SFTConfig
from megalite.sft.conversations import Conversation, Message, parse_conversation, read_conversations
from megalite.sft.dataset import build_sft_datasets, pack

QWEN_STYLE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- message['content'] + '<|im_end|>' + '\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 3?"},
     {"role": "assistant", "content": "2 + 3 = 5."}, {"role": "user", "content": "And times 4?"},
     {"role": "assistant", "content": "5 * 4 = 20."}],
    [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi! how can I help"}],
]


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
    """A tiny byte-level BPE tokenizer with Qwen's special tokens and the Qwen-style template, saved by
    transformers."""
    import tokenizers
    import transformers

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    corpus = [m["content"] for c in CONVERSATIONS for m in c] * 20 + ["system user assistant"] * 20
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                              "<|im_end|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>")
    fast.chat_template = QWEN_STYLE
    directory = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(directory)
    return directory, fast


@pytest.mark.parametrize("marked", [True, False], ids=["generation_marks", "prefix_rendering"])
def test_template_tokens_and_mask_equal_transformers(hf_tokenizer_dir, tmp_path, marked):
    directory, fast = hf_tokenizer_dir
    template = tmp_path / "template.jinja"
    template.write_text(QWEN_STYLE if marked else
                        QWEN_STYLE.replace("{% generation %}", "").replace("{% endgeneration %}", ""))
    tokenizer = HuggingFaceTokenizer(str(directory / "tokenizer.json"))
    chat = build_chat_format(SFTConfig(chat_template=str(template)), tokenizer, str(directory / "tokenizer.json"))
    for messages in CONVERSATIONS:
        want = fast.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = chat.encode(Conversation(tuple(Message(**m) for m in messages), "test"))
        assert ids == list(want["input_ids"])
        assert mask == list(want["assistant_masks"])
        masked_text = fast.decode([t for t, m in zip(ids, mask) if m])
        assert masked_text == "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")


def test_template_beside_the_tokenizer_is_found(hf_tokenizer_dir):
    directory, _ = hf_tokenizer_dir
    tokenizer = HuggingFaceTokenizer(str(directory / "tokenizer.json"))
    chat = build_chat_format(SFTConfig(), tokenizer, str(directory / "tokenizer.json"))
    assert chat.marked  # transformers saved our template (with its generation marks) beside tokenizer.json


def test_builtin_format_masks_the_answers_and_their_end_token():
    tokenizer = ByteTokenizer()
    messages = tuple(Message(**m) for m in CONVERSATIONS[0])
    ids, mask = BuiltinFormat(tokenizer).encode(Conversation(messages, "test"))
    assert tokenizer.detokenize([t for t in ids if t != tokenizer.eod]) == (
        "<|system|>\nBe brief.\n<|user|>\nWhat is 2 plus 3?\n<|assistant|>\n2 + 3 = 5.<|user|>\nAnd times 4?\n"
        "<|assistant|>\n5 * 4 = 20.")
    learned = [t for t, m in zip(ids, mask) if m]
    assert learned == list(b"2 + 3 = 5.") + [tokenizer.eod] + list(b"5 * 4 = 20.") + [tokenizer.eod]


def test_the_three_forms_and_errors_naming_file_and_line(tmp_path):
    cfg = SFTConfig()
    openai = {"messages": CONVERSATIONS[1]}
    sharegpt = {"conversations": [{"from": "human", "value": "hello there"},
                                  {"from": "gpt", "value": "hi! how can I help"}]}
    pair = {"prompt": "hello there", "answer": "hi! how can I help"}
    assert parse_conversation(openai, "f:1", cfg) == parse_conversation(sharegpt, "f:1", cfg) == \
        parse_conversation(pair, "f:1", cfg)
    custom = SFTConfig(sft_prompt_key="q", sft_answer_key="a")
    assert parse_conversation({"q": "hello there", "a": "hi! how can I help"}, "f:1", custom).messages == \
        parse_conversation(pair, "f:1", cfg).messages
    bad = {
        "not json": "f.jsonl:2: not JSON",
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}): "f.jsonl:2: unknown role 'robot'",
        json.dumps({"messages": [{"role": "user", "content": "x"}]}): "f.jsonl:2: the conversation has no assistant",
        json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}):
            "f.jsonl:2: the 'content' of a user turn is not a string",
        json.dumps({"text": "x"}): "f.jsonl:2: no conversation",
    }
    for line, message in bad.items():
        path = tmp_path / "f.jsonl"
        path.write_text(json.dumps(openai) + "\n" + line + "\n")
        with pytest.raises(DataError, match=message.replace("?", r"\?").replace("(", r"\(")):
            read_conversations(str(path).replace(str(tmp_path) + "/", str(tmp_path) + "/"), cfg)


def test_best_fit_decreasing_packing():
    lengths = [9, 2, 7, 3, 5, 5, 1, 10, 4]
    bins = pack(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 5 and bins == pack(lengths, 10)  # 46 tokens in 5 bins of 10: optimal here, deterministic


def test_packed_samples(tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS * 3))
    argv = ["--sft", "--data-path", str(data), "--seq-length", "160", "--reset-position-ids", "--reset-attention-mask",
            "--split", "1,0,0", "--vocab-size", "257", "--data-cache-path", str(tmp_path / "cache")]
    tokenizer = ByteTokenizer()
    train = build_sft_datasets(parse_args(argv), tokenizer, (7, 0, 0))[0]
    assert len(train) == 7 and train.stats.conversations == 6 and not train.stats.cut
    assert list((tmp_path / "cache").glob("chat-*_tokens.bin"))  # tokenized once, cached
    for i in range(len(train)):
        s = train[i]
        docs, pos = s["document_ids"], s["position_ids"]
        assert torch.equal(s["labels"][:-1], s["tokens"][1:])
        starts = torch.nonzero(pos == 0).squeeze(1)
        assert torch.equal(starts, torch.nonzero(torch.diff(docs, prepend=torch.tensor([-1]))).squeeze(1))
        boundary = torch.nonzero(torch.diff(docs)).squeeze(1)
        assert (s["loss_mask"][boundary] == 0).all()  # no token learns the next conversation's first token
        learned = tokenizer.detokenize([t for t, m in zip(s["labels"].tolist(), s["loss_mask"].tolist())
                                        if m and t != tokenizer.eod])
        assert learned.replace("2 + 3 = 5.5 * 4 = 20.", "").replace("hi! how can I help", "") == ""
    again = build_sft_datasets(parse_args(argv), tokenizer, (7, 0, 0))[0]
    assert all(torch.equal(train[i]["tokens"], again[i]["tokens"]) for i in range(7))  # reproducible order
    long = parse_args(argv[:3] + ["--seq-length", "16", "--sft-overlong", "drop"] + argv[5:])
    assert build_sft_datasets(long, tokenizer, (1, 0, 0))[0] is None  # every conversation is longer than 17
    with pytest.raises(DataError, match=r"chat.jsonl:1: the conversation has \d+ tokens, more than --seq-length 16"):
        build_sft_datasets(parse_args(argv[:3] + ["--seq-length", "16", "--sft-overlong", "error"] + argv[5:]),
                           tokenizer, (1, 0, 0))
    assert np.isclose(train.stats.padding, 1 - sum(train.lengths.values()) / (train.stats.bins * 161))
    assert train.stats.bins < 6  # packed: fewer samples than conversations
    padded = build_sft_datasets(parse_args(argv + ["--no-pack"]), tokenizer, (6, 0, 0))[0]
    assert padded.stats.bins == 6 and all(len(b) == 1 for b in padded.bins)
    assert all(padded[i]["document_ids"].max() == 1 for i in range(6))  # one conversation, then padding


def test_weighted_sft_data_is_refused():
    from megalite.arguments import resolve
    from megalite.validation import ConfigError

    with pytest.raises(ConfigError, match=re.escape("--sft --data-path: weights (1) are not supported")):
        resolve(parse_args(["--sft", "--data-path", "1", "a.jsonl"]), 1)


def test_a_missing_conversation_file_is_named(tmp_path):
    argv = ["--sft", "--data-path", str(tmp_path / "nope.jsonl"), "--vocab-size", "257"]
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        build_sft_datasets(parse_args(argv), ByteTokenizer(), (1, 0, 0))
