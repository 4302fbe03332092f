"""The MoE GPT on the launch layout (8 gloo ranks, TP=2 CP=4 EP=4 ETP=2, SP) and with DP and PP: the same losses
and parameters after 3 steps as one process (dropless routing, aux loss, z-loss and expert bias on)."""
import pytest

from megalite.testing.reference import assert_matches_single_process

MOE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
       "--ffn-hidden-size", "64", "--seq-length", "32", "--vocab-size", "128", "--global-batch-size", "4",
       "--lr", "0.01", "--swiglu", "--disable-bias-linear",
       # eps 1e-4: Adam amplifies fp32 summation-order noise (see tests/pipeline/test_pipeline_training.py)
       "--adam-eps", "1e-4",
       "--num-experts", "8", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32", "--moe-aux-loss-coeff",
       "0.01", "--moe-z-loss-coeff", "0.001", "--moe-shared-expert-intermediate-size", "32"]

CASES = {
    "launch_tp2_cp4_ep4_etp2": (8, ["--tensor-model-parallel-size", "2", "--context-parallel-size", "4",
                                    "--expert-model-parallel-size", "4", "--expert-tensor-parallel-size", "2",
                                    "--sequence-parallel", "--micro-batch-size", "2"], 2),
    "ep2_tp2_dp2_expert_bias": (4, ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2",
                                    "--expert-tensor-parallel-size", "1", "--micro-batch-size", "1",
                                    "--moe-router-enable-expert-bias", "--moe-router-score-function", "sigmoid",
                                    "--moe-router-bias-update-rate", "0.01"], 1),
    "ep2_pp2_layer_freq2": (4, ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2",
                                "--micro-batch-size", "1", "--moe-layer-freq", "2"], 1),
}



@pytest.mark.parametrize("name", sorted(CASES))
def test_moe_model_matches_single_process(name, world_of_one):
    world, flags, replica_micro_batch = CASES[name]
    assert_matches_single_process(world, MOE + flags, micro_batch_size=replica_micro_batch)
