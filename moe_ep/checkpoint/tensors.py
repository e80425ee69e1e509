"""Layout-free flat views of a model, its optimizer state and the RNG, as DCP state dicts.

Keys (``name`` is the key of the single-process model's ``state_dict()``,
so an expert stack reads ``layers.1.ffn.experts.w_in`` with global shape
``[E, H, 2I]`` at every layout)::

    model.<name>              parameters and persistent buffers (V3 bias, drop step)
    optim.<name>.<field>      the optimizer's state of parameter <name> (AdamW: step, exp_avg, exp_avg_sq)
    rng.<rank>.cpu            torch's CPU generator state of each rank
    rng.<rank>.cuda           and its CUDA generator state, when CUDA is in use

Expert stacks and their parameter-shaped optimizer state are DTensors on the
(dp, ep) mesh with placements ``(Replicate(), Shard(0))``: rank
``(dp_rank, ep_rank)`` holds rows ``[ep_rank * E/ep, (ep_rank + 1) * E/ep)``
(``ParallelState.expert_range``), every dp replica the same rows. Everything
else is an ordinary tensor, the same on every rank. The views share storage
with the model and optimizer, so a DCP load into them writes the model in
place; optimizer targets are fresh tensors handed to
``optimizer.load_state_dict`` afterwards.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..gradients import partition_parameters
from ..parallel.state import ParallelState
from .manifest import CheckpointError

MODEL, OPTIM, RNG = "model.", "optim.", "rng."


def checkpoint_mesh(parallel: ParallelState, device_type: str) -> Optional[DeviceMesh]:
    """A (dp, ep) DeviceMesh over ``parallel``'s own groups (no new group is created); None on one process.

    Built from ``edp_group`` / ``ep_group`` and every rank's (dp_rank,
    ep_rank), so it fits any ``ParallelState``: ``init_expert_parallel``'s
    mesh or DeepSpeed's groups.
    """
    if not parallel.distributed:
        return None
    coords = torch.tensor([parallel.dp_rank, parallel.ep_rank, dist.get_rank()], device=device_type)
    gathered = [torch.empty_like(coords) for _ in range(parallel.world_size)]
    dist.all_gather(gathered, coords, group=parallel.world_group)  # this pipeline stage's ranks
    grid = torch.full((parallel.dp_size, parallel.ep_size), -1, dtype=torch.long)
    for dp_rank, ep_rank, global_rank in (t.tolist() for t in gathered):
        grid[dp_rank, ep_rank] = global_rank
    if (grid < 0).any():
        raise CheckpointError(f"the ranks' (dp, ep) coordinates do not tile a {parallel.dp_size} x "
                              f"{parallel.ep_size} mesh: {grid.tolist()}")
    return DeviceMesh.from_group([parallel.edp_group, parallel.ep_group], device_type, mesh=grid,
                                 mesh_dim_names=("dp", "ep"))


class FlatState:
    """Builds the flat views of one model on one layout (see the module docstring)."""

    def __init__(self, model: nn.Module, parallel: ParallelState):
        self.model = model
        self.parallel = parallel
        device_type = next(model.parameters()).device.type
        self.mesh = checkpoint_mesh(parallel, device_type)
        _, experts = partition_parameters(model)
        expert_ids = {id(p) for p in experts}
        self.names = {id(p): name for name, p in model.named_parameters()}
        self.expert_names = {name for name, p in model.named_parameters() if id(p) in expert_ids}

    def globalize(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """``local`` as the global tensor of ``name``: a DTensor over the mesh for expert shards."""
        if self.mesh is None or name not in self.expert_names:
            return local
        shape = (local.shape[0] * self.parallel.ep_size, *local.shape[1:])
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(local, self.mesh, [Replicate(), Shard(0)], run_check=False, shape=shape,
                                  stride=stride)

    # ------------------------------------------------------------------ model
    def model_tensors(self) -> dict[str, torch.Tensor]:
        """``model.<name>`` views of the model's state dict (writable: a load fills the model)."""
        return {MODEL + name: self.globalize(name, t) for name, t in self.model.state_dict().items()}

    # -------------------------------------------------------------- optimizer
    def optimizer_tensors(self, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        """``optim.<name>.<field>`` views of the optimizer state (parameters without state are absent)."""
        out = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                name = self.names[id(p)]
                for field, value in optimizer.state.get(p, {}).items():
                    if not torch.is_tensor(value) or value.shape not in (p.shape, torch.Size([])):
                        raise CheckpointError(f"optimizer state {name}.{field} is neither a tensor shaped like "
                                              f"the parameter nor a scalar tensor; it cannot be checkpointed")
                    out[f"{OPTIM}{name}.{field}"] = self.globalize(name, value) if value.dim() else value
        return out

    def optimizer_targets(self, saved: dict) -> tuple[dict, dict]:
        """(DCP targets, per-parameter local tensors) for the optimizer state listed in ``saved``.

        ``saved`` maps each ``optim.<name>.<field>`` key of the checkpoint to
        its metadata (global size, dtype). Parameter-shaped fields get fresh
        local tensors of this rank's shard; scalars get scalar tensors. No
        optimizer is needed yet (``load_optimizer_state`` installs them).
        Under pipelining the entries of other stages' parameters are skipped.
        """
        params = dict(self.model.named_parameters())
        targets, state = {}, {}
        for key, meta in saved.items():
            name, field = key[len(OPTIM):].rsplit(".", 1)
            if name not in params:
                if self.parallel.pp_size > 1:
                    continue  # another pipeline stage's parameter
                raise CheckpointError(f"optimizer state {key!r} belongs to no parameter of this model")
            dtype = meta.properties.dtype
            local = torch.empty((), dtype=dtype) if len(meta.size) == 0 else torch.empty_like(params[name],
                                                                                               dtype=dtype)
            state.setdefault(name, {})[field] = local
            targets[key] = self.globalize(name, local) if local.dim() else local
        return targets, state

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Install per-parameter ``state`` (from ``optimizer_targets``) through ``optimizer.load_state_dict``."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        packed = {i: state[self.names[id(p)]] for i, p in enumerate(params) if self.names[id(p)] in state}
        optimizer.load_state_dict(dict(state=packed, param_groups=optimizer.state_dict()["param_groups"]))


def rng_tensors(rank: int) -> dict[str, torch.Tensor]:
    """This rank's generator states under ``rng.<rank>.*``."""
    out = {f"{RNG}{rank}.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out[f"{RNG}{rank}.cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(tensors: dict[str, torch.Tensor], rank: int) -> None:
    torch.set_rng_state(tensors[f"{RNG}{rank}.cpu"])
    if f"{RNG}{rank}.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors[f"{RNG}{rank}.cuda"])
