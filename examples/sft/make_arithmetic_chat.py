"""Writes arithmetic_chat.jsonl: 400 short conversations about sums, differences and products of small numbers, in the
three forms `megalite train --sft` reads (OpenAI messages, ShareGPT conversations, prompt/answer pairs), some with a
system prompt and some with a follow-up turn. Deterministic: `python make_arithmetic_chat.py` rewrites the same file.
"""
import json
import random
from pathlib import Path

OPS = {"+": ("plus", lambda a, b: a + b), "-": ("minus", lambda a, b: a - b), "*": ("times", lambda a, b: a * b)}
ASKS = ["What is {a} {word} {b}?", "Compute {a} {op} {b}.", "How much is {a} {op} {b}?", "{a} {op} {b} = ?"]
SYSTEMS = ["You are a careful calculator. Answer with the equation.", "Answer arithmetic questions briefly."]


def exchange(rng: random.Random) -> tuple[str, str, int]:
    op = rng.choice(list(OPS))
    a, b = rng.randint(0, 50), rng.randint(0, 12 if op == "*" else 50)
    word, fn = OPS[op]
    result = fn(a, b)
    return rng.choice(ASKS).format(a=a, b=b, op=op, word=word), f"{a} {op} {b} = {result}.", result


def conversation(rng: random.Random) -> list[dict]:
    messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.3 else []
    question, answer, result = exchange(rng)
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if rng.random() < 0.3:
        k = rng.randint(2, 5)
        messages += [{"role": "user", "content": f"And that times {k}?"},
                     {"role": "assistant", "content": f"{result} * {k} = {result * k}."}]
    return messages


def line(rng: random.Random, index: int) -> dict:
    messages = conversation(rng)
    form = index % 4
    if form == 2:  # ShareGPT
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in messages]}
    if form == 3 and len(messages) <= 3:  # prompt/answer pair
        record = {"prompt": messages[-2]["content"], "answer": messages[-1]["content"]}
        if messages[0]["role"] == "system":
            record["system"] = messages[0]["content"]
        return record
    return {"messages": messages}


def main() -> None:
    rng = random.Random(0)
    lines = [json.dumps(line(rng, i)) for i in range(400)]
    (Path(__file__).parent / "arithmetic_chat.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
