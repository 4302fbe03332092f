"""Writes arithmetic_prompts.jsonl: 256 prompts "What is A + B?" / "A * B" with their answers as labels (the rule
reward compares the response's last number with the label). Deterministic: rerunning rewrites the same file."""
import json
import random
from pathlib import Path


def main() -> None:
    rng = random.Random(1)
    lines = []
    for _ in range(256):
        a, b = rng.randint(0, 50), rng.randint(0, 12)
        op = rng.choice("+-*")
        result = {"+": a + b, "-": a - b, "*": a * b}[op]
        lines.append(json.dumps({"prompt": f"What is {a} {op} {b}?", "label": str(result)}))
    (Path(__file__).parent / "arithmetic_prompts.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
