"""Rule rewards (boxed answers, last numbers, normalisation, format bonus), user reward functions and their errors,
and the keeping strategies."""
import pytest
import torch

from megalite.errors import ConfigError, TrainingError
from megalite.rl.rewards import (
    compute_rewards,
    extract_boxed,
    final_answer,
    informative_groups,
    keep_samples,
    load_reward_fn,
    rule_reward,
)


def test_final_answers_and_rule_rewards():
    assert extract_boxed(r"so \boxed{\frac{1}{2}} and \boxed{x^{2}}") == "x^{2}"
    assert extract_boxed(r"\boxed{unclosed") is None
    assert final_answer(r"The answer is $\boxed{ 42 }$.") == "42"
    assert final_answer("17 + 25 = 42.") == "42" and final_answer("= -3.0") == "-3"
    assert final_answer("no digits here ") == "nodigitshere"
    assert rule_reward("q", "17 + 25 = 42.", "42") == 1.0
    assert rule_reward("q", "17 + 25 = 41.", "42") == 0.0
    assert rule_reward("q", r"\boxed{42}", "42", format_bonus=0.1) == pytest.approx(1.1)
    assert rule_reward("q", r"\boxed{41}", "42", format_bonus=0.1) == pytest.approx(0.1)


def test_user_reward_functions_and_their_errors(tmp_path):
    good = tmp_path / "reward.py"
    good.write_text("def length(prompt, response, label):\n    return len(response) / 10\n"
                    "def broken(prompt, response, label):\n    raise KeyError('oops')\n"
                    "def nan(prompt, response, label):\n    return float('nan')\n")
    assert compute_rewards(load_reward_fn(f"{good}:length"), ["p"], ["abcde"], ["x"]).tolist() == [0.5]
    with pytest.raises(TrainingError, match=r"the reward raised KeyError: 'oops' \(sample 0, prompt 'first'\)"):
        compute_rewards(load_reward_fn(f"{good}:broken"), ["first", "second"], ["a", "b"], ["", ""], "the reward")
    with pytest.raises(TrainingError, match="returned nan for sample 0"):
        compute_rewards(load_reward_fn(f"{good}:nan"), ["p"], ["r"], ["l"])
    for spec, message in ((f"{good}", "give FILE.py:NAME"), (f"{tmp_path}/none.py:f", "no such file"),
                          (f"{good}:missing", "has no function 'missing'")):
        with pytest.raises(ConfigError, match=message):
            load_reward_fn(spec)


def test_keeping_strategies():
    rewards = torch.tensor([[0.0, 1.0, 0.5, 1.0], [2.0, 2.0, 2.0, 2.0]])
    assert keep_samples(rewards, "all", 4).tolist() == [[0, 1, 2, 3]] * 2
    assert keep_samples(rewards, "test", 2).tolist() == [[0, 1]] * 2
    assert keep_samples(rewards, "best-and-worst", 2).tolist() == [[1, 0], [0, 1]]
    assert informative_groups(rewards).tolist() == [True, False]
