"""The vocab-parallel cross entropy on one rank equals torch's, and its in-place form (which consumes the logits)
gives the same losses and the same gradients through the layer that made the logits, fp32 and bf16."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megalite.tensor_parallel import vocab_parallel_cross_entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_equals_out_of_place_and_torch(world_of_one, dtype):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 5, 16, generator=g), torch.randn(40, 16, generator=g)
    target = torch.randint(0, 40, (2, 5), generator=g)
    results = []
    for in_place in (False, True):
        weight = w.to(dtype).requires_grad_()
        logits = F.linear(x.to(dtype), weight)
        loss = vocab_parallel_cross_entropy(logits, target, dist.group.WORLD, in_place=in_place)
        if in_place and dtype == torch.float32:  # consumed: the logits' storage now holds the softmax
            torch.testing.assert_close(logits.detach().sum(-1), torch.ones(2, 5))
        loss.sum().backward()
        results.append((loss.detach(), weight.grad))
    want = F.cross_entropy(F.linear(x.to(dtype), w.to(dtype)).float().view(-1, 40), target.view(-1),
                           reduction="none").view(2, 5)
    torch.testing.assert_close(results[0][0], want, rtol=1e-5, atol=1e-5)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
