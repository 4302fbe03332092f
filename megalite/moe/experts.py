"""The experts this rank holds: SwiGLU (or GeLU) MLPs without biases, each cut over the expert-TP group.

Experts are named by their global index (`experts.5.fc1.weight`) and only the local ones exist, so initialisation
from (seed, global name) gives every layout the same experts. fc1 is [2 x ffn, h] ([gate; up], each block split
over ETP: column-parallel with stride 2), fc2 is [h, ffn] (split along ffn: row-parallel); each ETP rank's output is a
partial sum, completed by the dispatcher's reduce-scatter. Gradients are summed over the expert-data-parallel group.

All local experts run as grouped GEMMs (megalite/moe/grouped.py); the per-expert parameters stay as they are, but
`LocalExperts` packs each kind (fc1, fc2) into one storage, the parameters being views of it at a uniform stride,
so the grouped products see the stacked [E, out, in] weights without a copy (after a conversion that replaces the
parameters' data, e.g. `.to(dtype)`, it packs them again). The per-expert loop remains as the reference
(`grouped = False`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megalite.config import ModelConfig
from megalite.context import ModelContext
from megalite.models.mlp import activation
from megalite.moe.grouped import grouped_mlp
from megalite.parallel_state import ProcessGroups
from megalite.tensor_parallel.layers import linear
from megalite.tensor_parallel.sharding import ShardSpec, set_spec


class ExpertLinear(torch.nn.Module):
    """y = x W^T, with this rank's shard of W [out, in] cut along `dim` over the ETP group."""

    def __init__(self, out_features: int, in_features: int, dim: int, etp: dist.ProcessGroup, context: ModelContext,
                 *, std: float, stride: int = 1):
        super().__init__()
        self.context = context
        spec = ShardSpec((out_features, in_features), dim=dim, rank=dist.get_rank(etp), size=dist.get_world_size(etp),
                         stride=stride, group="etp", std=std, data_parallel_group="edp")
        self.weight = set_spec(torch.nn.Parameter(torch.empty(spec.local_shape)), spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, None, self.context)


class ExpertMLP(torch.nn.Module):
    """fc1 -> SwiGLU (or GeLU) -> fc2 on this rank's slice of the expert's hidden units."""

    def __init__(self, cfg: ModelConfig, ffn: int, etp: dist.ProcessGroup, context: ModelContext, output_std: float):
        super().__init__()
        self.swiglu = cfg.swiglu
        width = 2 * ffn if cfg.swiglu else ffn
        self.fc1 = ExpertLinear(width, cfg.hidden_size, 0, etp, context, std=cfg.init_method_std,
                                stride=2 if cfg.swiglu else 1)
        self.fc2 = ExpertLinear(cfg.hidden_size, ffn, 1, etp, context, std=output_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(activation(self.fc1(x), self.swiglu))

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` without autograd and without the module machinery (generation calls experts on few rows)."""
        return F.linear(activation(F.linear(x, self.fc1.weight), self.swiglu), self.fc2.weight)


class LocalExperts(torch.nn.ModuleDict):
    """This EP rank's experts, keyed by global expert index. `grouped` (default True): grouped GEMMs; False: the
    per-expert loop (the reference the grouped path is tested and benchmarked against). `method` forces the
    grouped formulation ('grouped_mm' or 'bmm'; None: chosen per device, see megalite/moe/grouped.py)."""

    grouped: bool = True
    method: str | None = None

    def __init__(self, cfg: ModelConfig, groups: ProcessGroups, context: ModelContext, ffn: int, output_std: float):
        etp_size = dist.get_world_size(groups.etp)
        if ffn % etp_size:
            raise ValueError(f"expert hidden size {ffn} is not divisible by the expert-TP size {etp_size}")
        per_rank = cfg.num_experts // dist.get_world_size(groups.ep)
        first = dist.get_rank(groups.ep) * per_rank
        super().__init__({str(first + i): ExpertMLP(cfg, ffn, groups.etp, context, output_std) for i in range(per_rank)})
        self.swiglu, self.context = cfg.swiglu, context
        self._pack()

    def weights(self, name: str) -> list[torch.nn.Parameter]:
        """The local experts' `name` ('fc1' or 'fc2') weights, in expert order."""
        return [getattr(expert, name).weight for expert in self.values()]

    @torch.no_grad()
    def _pack(self) -> None:
        """Make each kind's weights views of one [E, out, in] storage (values kept)."""
        for name in ("fc1", "fc2"):
            params = self.weights(name)
            packed = torch.stack([p.detach() for p in params])
            for p, view in zip(params, packed.unbind(0)):
                p.data = view

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._pack()
        return self

    def forward(self, x: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        """Rows x [M, h] sorted by local expert, `tokens_per_expert[i]` of them for the i-th; an expert may get none.

        Grouped GEMMs over all experts (`grouped_mlp`: weight gradients deferred while the context defers them), or
        with `grouped` False the reference loop."""
        if self.grouped:
            return grouped_mlp(x, tokens_per_expert, self.weights("fc1"), self.weights("fc2"), self.swiglu,
                               self.context, self.method)
        return self.loop_forward(x, tokens_per_expert)

    def loop_forward(self, x: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        """The reference: a loop of per-expert matmuls (each through `linear`, so weight gradients can be deferred);
        without autograd (generation: few tokens per call) experts with no rows are skipped."""
        chunks = x.split(tokens_per_expert)
        if torch.is_grad_enabled():
            return torch.cat([expert(chunk) for expert, chunk in zip(self.values(), chunks)])
        return torch.cat([expert.infer(chunk) if n else chunk
                          for expert, chunk, n in zip(self.values(), chunks, tokens_per_expert)])
