"""Attention within documents (--reset-attention-mask): a packed row of three conversations gives, per
conversation, the logits and loss of that conversation run alone (fp32, rel 1e-5) on every attention back-end
available on CPU, and under CP 2 and 4 (ring p2p and all-gather); the flash-attn path's variable-length plumbing is
checked with a stand-in kernel; Transformer Engine is refused by name."""
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megalite import parallel_state as ps
from megalite.arguments import parse_args, resolve
from megalite.backends import documents as documents_module
from megalite.context_parallel import zigzag_shard, zigzag_unshard
from megalite.engine.setup import setup
from megalite.testing import run_distributed

VOCAB, LENGTHS = 64, [5, 7, 4]
MODEL = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
         "--ffn-hidden-size", "48", "--swiglu", "--vocab-size", str(VOCAB), "--seq-length", str(sum(LENGTHS)),
         "--micro-batch-size", "1", "--global-batch-size", "1"]


def packed() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens, position ids (restarting per conversation) and document ids, each [1, 16]."""
    tokens = torch.randint(0, VOCAB, (1, sum(LENGTHS)), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(n) for n in LENGTHS]).unsqueeze(0)
    documents = torch.cat([torch.full((n,), i) for i, n in enumerate(LENGTHS)]).unsqueeze(0)
    return tokens, positions, documents


def logits_of(argv: list[str]) -> torch.Tensor:
    """Full logits [16, V] of the packed row on this layout (gathered over CP)."""
    config, derived = resolve(parse_args(argv), dist.get_world_size())
    run = setup(config, derived, trainable=False)
    cp, rank = run.groups.size("cp"), run.groups.rank("cp")
    tokens, positions, documents = (zigzag_shard(t, 1, rank, cp) for t in packed())
    with torch.no_grad():
        logits = run.chunks[0](tokens, positions, document_ids=documents)[0]
    if cp > 1:
        parts = [torch.empty_like(logits) for _ in range(cp)]
        dist.all_gather(parts, logits.contiguous(), group=run.groups.cp)
        logits = zigzag_unshard(parts, dim=0)
    ps.destroy_model_parallel(run.groups)
    return logits


def alone(argv: list[str]) -> list[torch.Tensor]:
    """Each conversation's logits run by itself (positions from 0, no document ids)."""
    config, derived = resolve(parse_args(argv), 1)
    run = setup(config, derived, trainable=False)
    tokens = packed()[0][0]
    out = []
    with torch.no_grad():
        for piece in tokens.split(LENGTHS):
            out.append(run.chunks[0](piece.unsqueeze(0))[0])
    ps.destroy_model_parallel(run.groups)
    return out


def assert_per_conversation(got: torch.Tensor, want: list[torch.Tensor]) -> None:
    labels = packed()[0][0]
    for g, w, piece in zip(got.split(LENGTHS), want, labels.split(LENGTHS)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        loss = lambda x: F.cross_entropy(x[:-1, :VOCAB], piece[1:])  # noqa: E731
        assert abs(loss(g) - loss(w)) <= 1e-5 * abs(loss(w))


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_packed_row_equals_each_conversation_alone(world_of_one, backend):
    argv = MODEL + ["--attention-backend", backend]
    want = alone(argv)
    got = logits_of(argv)
    assert_per_conversation(got, want)
    whole = torch.cat(want)
    assert not torch.allclose(logits_of_without_documents(argv), whole, atol=1e-3)  # the mask matters


def logits_of_without_documents(argv: list[str]) -> torch.Tensor:
    config, derived = resolve(parse_args(argv), 1)
    run = setup(config, derived, trainable=False)
    tokens, positions, _ = packed()
    with torch.no_grad():
        out = run.chunks[0](tokens, positions)[0]
    ps.destroy_model_parallel(run.groups)
    return out


@pytest.mark.parametrize("cp, comm_type", [(2, "p2p"), (4, "p2p"), (4, "all_gather")])
def test_packed_row_under_context_parallelism(world_of_one, cp, comm_type):
    argv = MODEL + ["--context-parallel-size", str(cp), "--cp-comm-type", comm_type]
    want = alone(MODEL)
    for got in run_distributed(cp, logits_of, argv):
        assert_per_conversation(got, want)


def test_flash_varlen_plumbing_with_a_stand_in_kernel(world_of_one):
    """The flash-attn path flattens [b, s] rows into documents given by cumulative lengths; a stand-in kernel that
    runs causal SDPA on each document must give the masked result."""
    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal):
        assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and causal
        out = torch.empty_like(q)
        for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            assert b - a <= max_q
            piece = [x[a:b].transpose(0, 1) for x in (q, k, v)]  # [h, n, d]
            out[a:b] = F.scaled_dot_product_attention(*piece, is_causal=True, scale=softmax_scale,
                                                      enable_gqa=True).transpose(0, 1)
        return out

    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 4, 16, 8, generator=g), torch.randn(2, 2, 16, 8, generator=g), torch.randn(2, 2, 16, 8,
                                                                                                        generator=g)
    documents = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 16])
    offsets, longest = documents_module.document_offsets(documents)
    assert offsets.tolist() == [0, 5, 12, 16, 32] and longest == 16
    want = documents_module.document_attention(q, k, v, documents, backend="eager")
    with mock.patch.object(documents_module, "_flash_attn_varlen_func", lambda: varlen), \
            mock.patch.object(documents_module, "_require_cuda_package", lambda *a: None):
        got = documents_module.document_attention(q, k, v, documents, backend="flash")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not supported with --attention-backend te; use flash, sdpa or eager"):
        documents_module.document_attention(q, k, v, documents, backend="te")
