"""Zigzag sharding: which chunks each CP rank holds, the inverse, and the true positions of local tokens."""
import pytest
import torch

from megalite.context_parallel import zigzag_positions, zigzag_shard, zigzag_unshard


def test_rank_r_holds_chunks_r_and_2cp_minus_1_minus_r():
    tokens = torch.arange(8)
    assert zigzag_shard(tokens, 0, 0, 2).tolist() == [0, 1, 6, 7]
    assert zigzag_shard(tokens, 0, 1, 2).tolist() == [2, 3, 4, 5]
    assert [zigzag_shard(torch.arange(16), 0, r, 4).tolist() for r in range(4)] == [
        [0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9],
    ]


@pytest.mark.parametrize("cp", [1, 2, 4, 8])
@pytest.mark.parametrize("dim", [0, 1, 2])
def test_unshard_inverts_shard(cp, dim):
    x = torch.randn(32, 48, 16)
    shards = [zigzag_shard(x, dim, r, cp) for r in range(cp)]
    assert all(s.size(dim) == x.size(dim) // cp for s in shards)
    assert torch.equal(zigzag_unshard(shards, dim), x)


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_positions_are_the_sharded_positions_and_cover_the_sequence_once(cp):
    s = 24
    positions = [zigzag_positions(s, r, cp) for r in range(cp)]
    for r, p in enumerate(positions):
        assert p.dtype == torch.int64 and torch.equal(p, zigzag_shard(torch.arange(s), 0, r, cp))
    assert sorted(torch.cat(positions).tolist()) == list(range(s))


def test_indivisible_lengths_and_bad_ranks_are_rejected():
    with pytest.raises(ValueError, match="divisible by 2 \\* context-parallel size = 4"):
        zigzag_shard(torch.zeros(6), 0, 0, 2)
    with pytest.raises(ValueError, match="divisible"):
        zigzag_positions(10, 0, 4)
    with pytest.raises(ValueError, match="outside"):
        zigzag_positions(8, 2, 2)
