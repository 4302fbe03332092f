"""Flags -> config, derived values, and one test per validation rule."""
import dataclasses

import pytest

from megalite import arguments, validation
from megalite.arguments import ConfigError, parse_args, resolve, to_argv
from megalite.cli import main as cli_main
from megalite.validation import defaults

# rule name -> (flags, world size, a phrase the message must contain)
RULE_CASES = {
    "positive_parallel_sizes": (["--context-parallel-size", "0"], 8, "--context-parallel-size 0"),
    "world_divides_dense_grid": (["--tensor-model-parallel-size", "3"], 8, "world size 8 is not divisible"),
    "world_divides_expert_grid": (
        ["--expert-model-parallel-size", "3", "--num-experts", "6"], 8, "--expert-model-parallel-size 3"),
    "rank_order_is_a_permutation": (["--rank-order", "tp-cp-dp-pp"], 8, "--rank-order"),
    "heads_divisible_by_tp": (
        ["--tensor-model-parallel-size", "8", "--num-attention-heads", "4"], 8, "--num-attention-heads 4"),
    "query_groups_divisible_by_tp": (
        ["--tensor-model-parallel-size", "4", "--num-query-groups", "2"], 8, "--num-query-groups 2"),
    "heads_divisible_by_query_groups": (["--num-query-groups", "3"], 1, "--num-query-groups 3"),
    "hidden_divisible_by_heads": (["--hidden-size", "130"], 1, "--hidden-size 130"),
    "head_dim_even_for_rotary": (["--hidden-size", "12", "--num-attention-heads", "4"], 1, "odd"),
    "ffn_divisible_by_tp": (["--tensor-model-parallel-size", "2", "--ffn-hidden-size", "129"], 2,
                            "--ffn-hidden-size 129"),
    "experts_needed_for_ep": (["--expert-model-parallel-size", "2"], 2, "--num-experts"),
    "experts_divisible_by_ep": (["--expert-model-parallel-size", "4", "--num-experts", "6"], 8,
                                "--num-experts 6"),
    "topk_at_most_experts": (["--num-experts", "2", "--moe-router-topk", "3"], 1, "--moe-router-topk 3"),
    "expert_ffn_divisible_by_etp": (
        ["--num-experts", "4", "--expert-tensor-parallel-size", "2", "--moe-ffn-hidden-size", "33"], 2,
        "--moe-ffn-hidden-size 33"),
    "shared_expert_divisible_by_tp": (
        ["--tensor-model-parallel-size", "2", "--num-experts", "4", "--moe-shared-expert-intermediate-size", "33"],
        2, "--moe-shared-expert-intermediate-size 33"),
    "shared_expert_gate_needs_shared_expert": (["--num-experts", "4", "--moe-shared-expert-gate"], 1,
                                              "--moe-shared-expert-intermediate-size"),
    "moe_layer_freq_well_formed": (["--num-experts", "4", "--moe-layer-freq", "[1,0]"], 1,
                                   "the pattern has 2 entries for --num-layers 4"),
    "vocabulary_divisible_by_tp": (["--tensor-model-parallel-size", "2", "--vocab-size", "101",
                                    "--make-vocab-size-divisible-by", "25"], 2, "raise --make-vocab-size-divisible-by"),
    "layers_divisible_by_pp": (["--pipeline-model-parallel-size", "3", "--num-layers", "4"], 3, "--num-layers 4"),
    "interleaving_flags_agree": (["--pipeline-schedule", "interleaved", "--pipeline-model-parallel-size", "2"], 2,
                                 "needs --num-layers-per-virtual-pipeline-stage"),
    "interleaving_needs_pipeline": (["--pipeline-schedule", "zb-v"], 1, "--pipeline-model-parallel-size"),
    "virtual_stages_divide_layers": (
        ["--pipeline-model-parallel-size", "2", "--num-layers", "6", "--pipeline-schedule", "interleaved",
         "--num-layers-per-virtual-pipeline-stage", "2"], 2, "--num-layers-per-virtual-pipeline-stage 2"),
    "zero_bubble_v_needs_two_chunks": (
        ["--pipeline-model-parallel-size", "2", "--num-layers", "6", "--pipeline-schedule", "zb-v"], 2,
        "two chunks"),
    "sequence_divisible_for_cp": (["--context-parallel-size", "4", "--seq-length", "100"], 4, "2 x CP chunks"),
    "sequence_divisible_for_sp": (
        ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "129"], 2, "--seq-length 129"),
    "positive_shapes": (["--seq-length", "0"], 1, "--seq-length 0"),
    "dropout_is_a_probability": (["--hidden-dropout", "1.5"], 1, "--hidden-dropout 1.5"),
    "micro_batch_positive": (["--micro-batch-size", "0"], 1, "--micro-batch-size 0"),
    "global_batch_divisible": (["--global-batch-size", "10", "--micro-batch-size", "4"], 2,
                               "use a multiple of 8"),
    "interleaving_microbatches": (
        ["--pipeline-model-parallel-size", "4", "--num-layers", "8", "--pipeline-schedule", "interleaved",
         "--num-layers-per-virtual-pipeline-stage", "1", "--micro-batch-size", "1", "--global-batch-size", "6"],
        4, "multiple of --pipeline-model-parallel-size 4"),
    "one_precision": (["--bf16", "--fp16"], 1, "choose one"),
    "one_training_length": (["--train-iters", "10", "--train-samples", "100"], 1, "both set"),
    "train_samples_hold_a_batch": (["--train-samples", "3", "--micro-batch-size", "4"], 1,
                                   "less than one global batch of 4"),
    "learning_rates_ordered": (["--lr", "1e-4", "--min-lr", "1e-3"], 1, "--min-lr"),
    "intervals_positive": (["--log-interval", "0", "--eval-interval", "0"], 1,
                           "--log-interval 0, --eval-interval 0: intervals"),
    "clip_grad_not_negative": (["--clip-grad", "-1"], 1, "--clip-grad -1.0 must be at least 0"),
    "attention_dropout_without_ring": (["--context-parallel-size", "2", "--attention-dropout", "0.1"], 2,
                                       "ring attention has no attention dropout"),
    "warmup_within_decay": (["--lr-warmup-iters", "100", "--lr-decay-iters", "10"], 1, "--lr-warmup-iters 100"),
    "save_interval_needs_save": (["--save-interval", "10"], 1, "--save DIR"),
    "data_path_well_formed": (["--data-path", "0.5", "a", "b"], 1, "--data-path"),
    "split_well_formed": (["--split", "9,x,1"], 1, "--split"),
    "tokenizer_model_given": (["--tokenizer-type", "HuggingFaceTokenizer"], 1, "--tokenizer-model"),
    "sft_data_given": (["--sft"], 1, "--sft needs --data-path"),
    "document_masks_supported": (["--reset-attention-mask", "--attention-backend", "te"], 1,
                                 "--reset-attention-mask is not supported with --attention-backend te"),
    "fp8_refused": (["--fp8-format", "hybrid", "--fp8-param-gather"], 1, "does not implement fp8"),
    "decoupled_lr_refused": (["--decoupled-lr", "5e-4"], 1, "--decoupled-lr"),
    "rampup_batch_size_refused": (["--rampup-batch-size", "16", "16", "5859375"], 1, "--rampup-batch-size"),
    "rotary_positions_only": (["--position-embedding-type", "learned_absolute"], 1, "rotary position embeddings only"),
    "sequence_within_max_positions": (["--seq-length", "4096", "--max-position-embeddings", "2048"], 1,
                                      "exceeds --max-position-embeddings 2048"),
    "schedule_in_iterations_or_samples": (["--lr-decay-iters", "10", "--lr-decay-samples", "100"], 1,
                                          "--lr-decay-iters and --lr-decay-samples"),
    "tokenizer_usable": (["--tokenizer-type", "Llama2Tokenizer"], 1, "give the model's tokenizer.json"),
}


def test_there_are_at_least_25_rules_and_each_has_a_case():
    names = {r.__name__ for r in validation.RULES}
    assert len(names) >= 25
    assert names == set(RULE_CASES)


@pytest.mark.parametrize("name", sorted(RULE_CASES))
def test_rule_rejects_its_case_with_a_message_naming_the_flag(name):
    flags, world, phrase = RULE_CASES[name]
    config = parse_args(flags)
    rule = next(r for r in validation.RULES if r.__name__ == name)
    message = rule(config, defaults(config, world))
    assert message is not None and phrase in message, message
    with pytest.raises(ConfigError, match=r"invalid configuration"):
        resolve(config, world)


@pytest.mark.parametrize("name", sorted(RULE_CASES))
def test_rule_accepts_the_defaults(name):
    rule = next(r for r in validation.RULES if r.__name__ == name)
    assert rule(parse_args([]), defaults(parse_args([]), 1)) is None


@pytest.mark.parametrize("flags, world, expected", [
    ([], 1, {"ffn_hidden_size": 512, "global_batch_size": 4, "moe_ffn_hidden_size": None}),
    (["--tensor-model-parallel-size", "2", "--num-experts", "4", "--expert-model-parallel-size", "2"], 4,
     {"data_parallel_size": 2, "expert_tensor_parallel_size": 2, "expert_data_parallel_size": 1,
      "moe_ffn_hidden_size": 512}),
    (["--swiglu", "--hidden-size", "96", "--num-attention-heads", "4", "--num-experts", "2"], 1,
     {"ffn_hidden_size": 256, "moe_ffn_hidden_size": 256, "expert_tensor_parallel_size": 1}),
    (["--micro-batch-size", "2", "--pipeline-model-parallel-size", "2", "--num-query-groups", "2"], 8,
     {"data_parallel_size": 4, "global_batch_size": 8, "num_microbatches": 1, "num_query_groups": 2}),
])
def test_rules_and_resolve_share_the_defaults_computed_once(flags, world, expected, monkeypatch):
    config = parse_args(flags)
    computed, seen = [], []
    monkeypatch.setattr(validation, "defaults", lambda c, w: computed.append(defaults(c, w)) or computed[-1])
    monkeypatch.setattr(validation, "RULES", (*validation.RULES, lambda c, d: seen.append(d)))
    filled, derived = resolve(config, world)
    assert len(computed) == 1 and seen[0] is computed[0]
    d = computed[0]
    assert dataclasses.asdict(d).items() >= expected.items()
    assert {f.name: getattr(derived, f.name) for f in dataclasses.fields(d)} == dataclasses.asdict(d)
    assert filled.parallel.expert_tensor_parallel_size == d.expert_tensor_parallel_size
    assert filled.model.num_query_groups == d.num_query_groups
    assert filled.model.ffn_hidden_size == d.ffn_hidden_size
    assert filled.model.moe_ffn_hidden_size == d.moe_ffn_hidden_size
    assert filled.training.global_batch_size == d.global_batch_size


def test_defaults_do_not_raise_on_invalid_sizes():
    config = parse_args(["--tensor-model-parallel-size", "0", "--micro-batch-size", "0", "--num-attention-heads",
                         "0", "--expert-model-parallel-size", "-1"])
    d = defaults(config, 8)
    assert d.num_microbatches == 0 and d.expert_tensor_parallel_size == 0
    with pytest.raises(ConfigError, match="--tensor-model-parallel-size 0"):
        resolve(config, 8)


def test_launch_layout_derives_dp_edp_and_microbatches():
    config = parse_args([
        "--tensor-model-parallel-size", "2", "--context-parallel-size", "4", "--expert-model-parallel-size", "4",
        "--expert-tensor-parallel-size", "2", "--num-experts", "8", "--sequence-parallel", "--seq-length", "256",
        "--micro-batch-size", "1", "--global-batch-size", "8", "--train-samples", "800",
    ])
    config, derived = resolve(config, 8)
    assert derived.data_parallel_size == 1
    assert derived.expert_data_parallel_size == 1
    assert derived.num_microbatches == 8
    assert derived.train_iters == 100 and config.training.train_iters == 100
    assert "microbatches per step" in derived.table()


def test_dp_and_global_batch_defaults():
    config, derived = resolve(parse_args(["--micro-batch-size", "2", "--pipeline-model-parallel-size", "2"]), 8)
    assert derived.data_parallel_size == 4
    assert derived.global_batch_size == 8 and derived.num_microbatches == 1
    assert derived.train_iters == arguments.DEFAULT_TRAIN_ITERS


def test_virtual_pipeline_size_and_swiglu_ffn():
    config = parse_args(["--pipeline-model-parallel-size", "2", "--num-layers", "8", "--pipeline-schedule",
                         "interleaved", "--num-layers-per-virtual-pipeline-stage", "2", "--swiglu",
                         "--hidden-size", "96", "--num-attention-heads", "4", "--global-batch-size", "8"])
    config, derived = resolve(config, 2)
    assert derived.virtual_pipeline_size == 2
    assert derived.ffn_hidden_size == 256  # 8/3 * 96 = 256


def test_train_iters_minus_one_is_derived_from_samples():
    config, derived = resolve(parse_args(["--train-iters", "-1", "--train-samples", "64"]), 1)
    assert derived.train_iters == 16


def test_epochs_give_iterations_once_the_dataset_size_is_known():
    config, _ = resolve(parse_args(["--train-epochs", "2", "--micro-batch-size", "4"]), 1)
    config, iters = arguments.derive_train_length_from_epochs(config, samples_per_epoch=50)
    assert iters == 25 and config.training.train_samples == 100
    with pytest.raises(ConfigError, match="--train-epochs"):
        arguments.derive_train_length_from_epochs(config, samples_per_epoch=1)


def test_to_argv_round_trips():
    flags = ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--data-path", "0.3", "a", "0.7", "b",
             "--lr", "0.0003"]
    config = parse_args(flags)
    assert parse_args(to_argv(config)) == config


def test_every_flag_has_help_from_the_config_docstrings(capsys):
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ["--tensor-model-parallel-size", "--context-parallel-size", "--expert-model-parallel-size",
                 "--expert-tensor-parallel-size", "--pipeline-model-parallel-size",
                 "--num-layers-per-virtual-pipeline-stage", "--sequence-parallel", "--micro-batch-size",
                 "--global-batch-size", "--seq-length", "--lr", "--min-lr", "--train-iters", "--save", "--load",
                 "--save-interval", "--data-path"]:
        assert flag in out
    assert "Tensor parallelism (TP)" in out
    # help that describes what the code does (both used to describe something else)
    assert "Global batches per validation pass" in " ".join(out.split())
    assert "independent of the layout" in " ".join(out.split())


def test_invalid_flags_exit_with_the_rule_message(capsys):
    assert cli_main(["train", "--hidden-dropout", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "--hidden-dropout 1.5 must be in [0, 1)" in err
    assert "usage:" not in err and "Traceback" not in err and len(err.splitlines()) == 2


def test_abbreviated_flags_are_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "--micro", "2"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == ("megalite train: error: unrecognized arguments: --micro 2 "
                                               "(see megalite train --help)")


@pytest.mark.parametrize("flags, message", [
    (["--lr=-1e-3"], "--lr -0.001 must be a finite number of at least 0"),
    (["--lr", "nan"], "--lr nan must be a finite number"),
    (["--min-lr", "inf"], "--min-lr inf must be a finite number"),
])
def test_learning_rate_errors_blame_the_flag_that_is_wrong(flags, message):
    with pytest.raises(ConfigError, match=message):
        resolve(parse_args(flags), 1)
