"""Checkpoints travel between layouts: save after one step under layout A, load under layout B, and the next 3 steps
(losses and parameters) equal continuing under A, fp32, to the tolerance of the equivalence tests. Also the pure box
arithmetic, and what is refused (another model, old per-rank files, planted pickles, damaged files)."""
import os
import pickle
from pathlib import Path

import pytest
import torch

from megalite.checkpoint.boxes import Box, flat_range_boxes, segment_boxes, shard_box
from megalite.tensor_parallel.sharding import ShardSpec
from megalite.testing import run_distributed
from megalite.testing.reference import logged_losses, merged_params, relative_error, train_and_collect

MODEL = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "8", "--num-query-groups", "4",
         "--ffn-hidden-size", "64", "--seq-length", "16", "--vocab-size", "128", "--global-batch-size", "8",
         "--lr", "0.01", "--swiglu", "--disable-bias-linear", "--adam-eps", "1e-4"]
MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32"]
EIGHT_LAYERS = ["--num-layers", "8", "--hidden-size", "16"]  # the later flags win
LAUNCH = ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--context-parallel-size", "4",
          "--expert-model-parallel-size", "4", "--expert-tensor-parallel-size", "2", "--use-distributed-optimizer",
          "--micro-batch-size", "8"]

PAIRS = {  # name: ((world, flags of A), (world, flags of B)); MoE runs without aux losses (they depend on the split)
    "single_to_launch_layout": ((1, MOE + ["--micro-batch-size", "8"]), (8, MOE + LAUNCH)),
    "launch_layout_to_single": ((8, MOE + LAUNCH), (1, MOE + ["--micro-batch-size", "4"])),
    "tp4_to_tp2_pp2": ((4, ["--tensor-model-parallel-size", "4", "--micro-batch-size", "4"]),
                       (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                            "--micro-batch-size", "2"])),
    "pp2_interleaved_to_pp4_zb-v": ((2, EIGHT_LAYERS + ["--pipeline-model-parallel-size", "2", "--pipeline-schedule",
                                                        "interleaved", "--num-layers-per-virtual-pipeline-stage", "2",
                                                        "--micro-batch-size", "4"]),
                                    (4, EIGHT_LAYERS + ["--pipeline-model-parallel-size", "4", "--pipeline-schedule",
                                                        "zb-v", "--micro-batch-size", "2"])),
    "ep4_to_ep2_dp2": ((4, MOE + ["--expert-model-parallel-size", "4", "--micro-batch-size", "2"]),
                       (4, MOE + ["--expert-model-parallel-size", "2", "--micro-batch-size", "1"])),
    "distributed_optimizer_on_to_off": ((4, ["--use-distributed-optimizer", "--ddp-bucket-size", "777",
                                             "--tensor-model-parallel-size", "2", "--micro-batch-size", "2"]),
                                        (4, ["--tensor-model-parallel-size", "2", "--micro-batch-size", "2"])),
    "dp4_to_dp2": ((4, ["--micro-batch-size", "2"]), (2, ["--micro-batch-size", "2"])),
    "tp2_sp_cp2_to_pp2_zb-h1_dp2": ((4, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                         "--context-parallel-size", "2", "--micro-batch-size", "4"]),
                                    (4, ["--pipeline-model-parallel-size", "2", "--pipeline-schedule", "zb-h1",
                                         "--micro-batch-size", "2", "--use-distributed-optimizer"])),
    "ep2_etp2_tp2_to_ep4_etp1": ((4, MOE + ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size",
                                            "2", "--expert-tensor-parallel-size", "2", "--micro-batch-size", "4"]),
                                 (4, MOE + ["--expert-model-parallel-size", "4", "--expert-tensor-parallel-size",
                                            "1", "--micro-batch-size", "2"])),
    "cp2_all_gather_distopt_to_tp2_sp_pp2": ((4, ["--context-parallel-size", "2", "--cp-comm-type", "all_gather",
                                                  "--use-distributed-optimizer", "--micro-batch-size", "2"]),
                                             (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                                  "--pipeline-model-parallel-size", "2", "--micro-batch-size", "4"])),
}


def _on(world: int, *args) -> list[dict]:
    return run_distributed(world, train_and_collect, *args) if world > 1 else [train_and_collect(*args)]


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_a_checkpoint_loads_under_another_layout(name, tmp_path, world_of_one):
    (world_a, a), (world_b, b) = PAIRS[name]
    directory = str(tmp_path / "ckpt")
    under_a = _on(world_a, MODEL + a, 4, None, None, (directory, 1))
    under_b = _on(world_b, MODEL + b, 3, None, None, None, directory)
    want, got = logged_losses(under_a)[1:], logged_losses(under_b)
    assert all(abs(x - y) / abs(y) < 1e-5 for x, y in zip(got, want)) and len(got) == 3, (got, want)
    expected, params = merged_params(under_a), merged_params(under_b)
    assert params.keys() == expected.keys()
    for key, value in expected.items():
        assert relative_error(params[key], value) < 1e-5, key


# --------------------------------------------------------------------------------------------- pure box arithmetic
def test_a_flat_range_is_covered_by_boxes_in_order():
    shape = (3, 4, 5)
    full = torch.arange(60).reshape(shape)
    for start, end in [(0, 60), (7, 53), (5, 10), (20, 40), (13, 14), (0, 1), (59, 60), (21, 38)]:
        boxes = flat_range_boxes(shape, start, end)
        assert len(boxes) <= 2 * len(shape) - 1
        pieces = [full[tuple(slice(o, o + n) for o, n in zip(b.offsets, b.shape))].reshape(-1) for b in boxes]
        assert torch.equal(torch.cat(pieces), torch.arange(start, end)), (start, end)


def test_shards_are_boxes_of_the_logical_tensor():
    gate_up = ShardSpec((8, 3), dim=0, rank=1, size=2, stride=2)  # [gate; up], each block cut in two
    assert shard_box(gate_up) == ((2, 4, 3), Box((0, 2, 0), (2, 2, 3)))
    qkv = ShardSpec((24, 8), dim=0, rank=1, size=2, logical_shape=(2, 3, 4, 8))  # 2 groups of (1 q + k + v) x 4
    assert shard_box(qkv) == ((2, 3, 4, 8), Box((1, 0, 0, 0), (1, 3, 4, 8)))
    row = ShardSpec((4, 6), dim=1, rank=2, size=3)
    assert segment_boxes(row, 1, 5) == [Box((0, 5), (1, 1)), Box((1, 4), (1, 2)), Box((2, 4), (1, 1))]
    assert Box((0, 0), (2, 4)).intersect(Box((1, 3), (5, 5))) == Box((1, 3), (1, 1))
    assert Box((0, 0), (2, 4)).intersect(Box((2, 0), (1, 1))) is None


# ------------------------------------------------------------------------------------------------- what is refused
TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--vocab-size", "128", "--micro-batch-size", "2", "--global-batch-size", "4"]


class _Payload:
    """Unpickling this runs code: it creates the file named `marker`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mknod, (self.marker,))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, world_of_one) -> Path:
    directory = tmp_path_factory.mktemp("saved")
    train_and_collect(TINY, 1, None, None, (str(directory), 1))
    return directory


def _load(directory: Path) -> None:
    train_and_collect(TINY, 0, None, None, None, str(directory))


def _copy(saved: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(saved, target)
    return target


@pytest.mark.parametrize("victim", ["index.json", "rank00000.safetensors", "latest"])
def test_a_planted_pickle_is_refused_without_running_it(victim, saved, tmp_path):
    directory = _copy(saved, tmp_path)
    marker = tmp_path / "pwned"
    path = directory / victim if victim == "latest" else directory / "iter_0000001" / victim
    path.write_bytes(pickle.dumps(_Payload(str(marker))))
    from megalite.errors import CheckpointError

    with pytest.raises(CheckpointError, match=str(path.name)):
        _load(directory)
    assert not marker.exists()


def test_a_checkpoint_of_another_model_names_the_differing_fields(saved, world_of_one):
    from megalite.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"hidden_size: checkpoint 32, this run 64"):
        train_and_collect([*TINY[:2], "--hidden-size", "64", *TINY[4:]], 0, None, None, None, str(saved))


def test_an_old_per_rank_checkpoint_is_refused_clearly(tmp_path, world_of_one):
    old = tmp_path / "old" / "iter_0000010"
    old.mkdir(parents=True)
    (old / "rank00000.pt").write_bytes(b"not read")
    (old / "meta.json").write_text("{}")
    from megalite.errors import CheckpointError

    with pytest.raises(CheckpointError, match="old per-rank checkpoint"):
        _load(old.parent)


def test_an_edited_index_is_refused(saved, tmp_path):
    import json

    directory = _copy(saved, tmp_path)
    index_path = directory / "iter_0000001" / "index.json"
    index = json.loads(index_path.read_text())
    index["state"]["iteration"] = 7
    index_path.write_text(json.dumps(index))
    from megalite.errors import CheckpointError

    with pytest.raises(CheckpointError, match="index.json does not match its checksum"):
        _load(directory)


def test_a_missing_box_is_refused_naming_the_tensor(saved, tmp_path):
    import json

    directory = _copy(saved, tmp_path)
    index_path = directory / "iter_0000001" / "index.json"
    from megalite.checkpoint.store import sealed_json

    index = json.loads(index_path.read_text())
    index.pop("checksum")
    index["tensors"]["layers.1.mlp.fc2.weight"]["boxes"] = []
    index_path.write_text(sealed_json(index))  # an index consistent in itself, lacking a box
    from megalite.errors import CheckpointError

    with pytest.raises(CheckpointError, match="layers.1.mlp.fc2.weight"):
        _load(directory)
