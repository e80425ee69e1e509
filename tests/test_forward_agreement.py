"""Ranks of an EP group that disagree on the mode, the compute dtype or the forward count fail together, at once.

Before, the first collective of ``MoELayer.forward`` depended on the mode (the
drop plan's all-gather ran only when a capacity applied), so a rank in
``eval()`` beside one in training, or one under bf16 autocast beside one in
fp32, issued different collectives: a wait until the collective timeout, or
rows of one dtype read as another. Two spawned gloo ranks, ep 2, with a
collective timeout of 10 s so that a regression fails instead of hanging.
"""
import contextlib
import time

import pytest
import torch

from moe_ep.parallel.spawn import run_on_ranks

CONFIG = dict(hidden_size=16, moe_intermediate_size=8, n_routed_experts=4, num_experts_per_tok=2,
              expert_capacity_factor=1.0)  # a capacity in training only: the mode changes the drop step
NAME = "layers.1.ffn"


def _disagreeing_forwards(rank: int, world: int) -> dict:
    """Three forwards that disagree in one field each; the error of each (None: no error) and its time."""
    import moe_ep
    from moe_ep import MoEConfig, MoELayer

    layer = MoELayer(MoEConfig(**CONFIG), moe_ep.init_expert_parallel(ep_size=2, timeout=10.0), name=NAME)
    x = torch.randn(3, 4, 16)
    out = {}
    for field in ("training", "compute_dtype", "forward_count"):
        layer.train(rank == 0 if field == "training" else True)
        if field == "forward_count":
            layer.forward_count += rank  # as if rank 0 had skipped a forward
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if field == "compute_dtype" and rank == 1 \
            else contextlib.nullcontext()
        start = time.monotonic()
        try:
            with autocast:
                layer(x)
            out[field] = None
        except ValueError as err:
            out[field] = str(err)
        out[field + "_seconds"] = time.monotonic() - start
    layer.forward_count = 4
    out["finite_after"] = bool(torch.isfinite(layer(x)).all())  # the group is still in step
    return out


@pytest.mark.timeout(120)
def test_disagreeing_mode_dtype_or_forward_count_raise_on_every_rank():
    expected = {"training": "rank 0 has True, rank 1 has False",
                "compute_dtype": "rank 0 has torch.float32, rank 1 has torch.bfloat16",
                "forward_count": "rank 0 has 3, rank 1 has 4"}
    for rank, result in enumerate(run_on_ranks(_disagreeing_forwards, 2, timeout=90)):
        for field, values in expected.items():
            assert result[field] == f"MoELayer '{NAME}': ranks disagree on {field}: {values}", (rank, result[field])
            assert result[field + "_seconds"] < 5, (rank, field)  # at once, not after the 10 s collective timeout
        assert result["finite_after"]
