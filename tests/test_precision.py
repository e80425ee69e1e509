"""bf16, gradient accumulation and activation checkpointing in the plain loop, and the MoE state they touch.

Single process: the layer's dtypes under autocast, casts that keep counts and
the bias in full precision, pending loads / drop step committed or
discarded, and the three run-level checks (accumulation == one batch,
checkpointing == none, bf16 tracks fp32) at ep 1. Two gloo ranks: the same
run-level checks at ep 2 (accumulation also at ep 1 = dp 2). The rank
functions are in tests/precision_workers.py.
"""
import pytest
import torch

from moe_ep import MoEConfig, MoELayer, ParallelState
from moe_ep.expert_ffn import expert_ffn
from moe_ep.parallel.spawn import run_on_ranks
from moe_ep.training import TrainConfig
from moe_ep.model_moe import moe_layers

from . import precision_workers as workers

pytestmark = pytest.mark.timeout(120)

LAYER = dict(hidden_size=16, moe_intermediate_size=8, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
             expert_balance_coef=0.01, z_loss_coef=1e-3)
# Seen with bf16 autocast: per-step losses within 0.35% of fp32 over 8 steps (loss 5.45 -> 3.49).
BF16_LOSS_RTOL = 0.02


def _spy_dispatcher(layer: MoELayer, seen: dict) -> None:
    inner = layer.dispatcher

    def spy(x_TH, topk_idx_TK, topk_weight_TK, *rest):
        seen.update(rows=x_TH.dtype, gates=topk_weight_TK.dtype)
        return inner(x_TH, topk_idx_TK, topk_weight_TK, *rest)

    layer.dispatcher = spy


def test_layer_under_autocast_routes_in_fp32_and_computes_experts_in_bf16():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(**LAYER))
    reference = MoELayer(MoEConfig(**LAYER))
    reference.load_state_dict(layer.state_dict())
    seen: dict = {}
    _spy_dispatcher(layer, seen)
    x = torch.randn(2, 6, 16, requires_grad=True)  # fp32, as the residual stream arrives under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert seen == dict(rows=torch.bfloat16, gates=torch.float32)  # rows cross the dispatch in bf16
    assert y.dtype == torch.bfloat16
    assert layer.aux_loss.dtype == torch.float32 and layer.last_stats.max_violation.dtype == torch.float32
    assert layer.load_accum.dtype == torch.float64
    (y.float().square().sum() + layer.aux_loss).backward()
    assert all(p.grad.dtype == torch.float32 for p in layer.parameters())  # fp32 weights, fp32 gradients
    y_ref = reference(x)
    assert torch.equal(layer.last_stats.tokens_per_expert, reference.last_stats.tokens_per_expert)  # same routing
    assert torch.allclose(layer.aux_loss, reference.aux_loss, rtol=1e-6)  # router and losses stayed fp32
    assert torch.allclose(y.float(), y_ref, rtol=3e-2, atol=3e-2) and not torch.equal(y.float(), y_ref)


def test_expert_ffn_ignores_autocast_and_checks_weight_dtypes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 16, generator=g).bfloat16()
    w_in, w_out = torch.randn(2, 16, 16, generator=g).bfloat16(), torch.randn(2, 8, 16, generator=g).bfloat16()
    row, counts, weight = torch.tensor([0, 2, 5, 1]), torch.tensor([3, 1]), torch.rand(4, generator=g)
    plain = expert_ffn(x, row, counts, weight, w_in, w_out, "swiglu")
    with torch.autocast("cpu", dtype=torch.float16):  # would change the products if it applied
        under = expert_ffn(x, row, counts, weight, w_in, w_out, "swiglu")
    assert under.dtype == torch.bfloat16 and torch.equal(plain, under)
    with pytest.raises(ValueError, match="cast the weights"):
        expert_ffn(x, row, counts, weight, w_in.float(), w_out, "swiglu")


def test_dtype_casts_keep_the_loads_and_the_bias_in_full_precision():
    layer = MoELayer(MoEConfig(**LAYER, aux_free_bias=True)).to(torch.bfloat16)
    assert layer.experts.w_in.dtype == torch.bfloat16
    assert layer.load_accum.dtype == torch.float64
    assert layer.router.e_score_correction_bias.dtype == torch.float32


def test_pending_step_is_committed_or_discarded():
    cfg = MoEConfig(**LAYER, aux_free_bias=True, bias_update_rate=0.1, expert_capacity_factor=0.5,
                    protected_seq_frac=0.5)
    torch.manual_seed(0)
    layer = MoELayer(cfg).train()
    keeps: list = []
    inner = layer.dispatcher
    layer.dispatcher = lambda *args: keeps.append(inner(*args)) or keeps[-1]
    x = torch.randn(4, 8, 16)
    with torch.no_grad():
        layer(x)
    assert layer.load_accum.sum() == 4 * 8 * 2 and layer.pending_drop_forwards == 1 and int(layer.drop_step) == 0
    layer.discard_pending()  # the optimizer skipped the step
    assert layer.load_accum.sum() == 0 and layer.pending_drop_forwards == 0
    assert int(layer.drop_step) == 0 and layer.router.e_score_correction_bias.abs().sum() == 0
    with torch.no_grad():
        layer(x)
    assert torch.equal(keeps[0].keep_TK, keeps[1].keep_TK)  # the same protected window again
    layer.update_bias()
    assert int(layer.drop_step) == 1 and layer.router.e_score_correction_bias.abs().sum() > 0
    with torch.no_grad():
        layer(x)
    assert not torch.equal(keeps[0].keep_TK, keeps[2].keep_TK)  # the window moved


def test_train_config_checks_the_new_fields():
    with pytest.raises(ValueError, match="do not divide batch_size 6"):
        TrainConfig(batch_size=6, grad_accum=4)
    with pytest.raises(ValueError, match="fp16 needs loss scaling"):
        TrainConfig(precision="fp16")


def _check_accumulation(r: dict, where: str) -> None:
    assert r["micro_batches"] == (1, 2) and r["pairs"][0] == r["pairs"][1] and r["loads_equal"], (where, r)
    assert r["moved"] > 1e-3, f"{where}: the step did not move the parameters"
    assert r["grad_diff"] <= 1e-7, f"{where}: gradients differ by {r['grad_diff']:.2e}"
    assert r["param_diff"] <= 1e-6, f"{where}: parameters differ by {r['param_diff']:.2e} after the step"
    assert r["ce"][0] == pytest.approx(r["ce"][1], rel=1e-6) and r["aux"][0] == pytest.approx(r["aux"][1], rel=1e-6)
    assert r["grad_norm"][0] == pytest.approx(r["grad_norm"][1], rel=1e-6)
    assert r["bias_equal"] and r["bias_moved"] > 0, f"{where}: the bias update differs from the single batch's"


def _check_checkpointing(r: dict, where: str) -> None:
    assert r["dropped"] > 0, f"{where}: nothing was dropped, the replay is not exercised"
    assert all(r["same"].values()), f"{where}: differs with checkpointing: {r['same']}"
    assert r["param_diff"] == 0.0 and r["bias_equal"], (where, r["param_diff"])
    assert r["replayed"], f"{where}: a recomputation routed or dropped differently from its forward"
    assert r["drop_step"] == [2, 2, 2] and r["forward_count"] == [2, 2, 2], (where, r)


def _check_bf16(r: dict, where: str) -> None:
    assert r["fp32_ce"][-1] < r["fp32_ce"][0] - 1.0, f"{where}: the fp32 run did not learn: {r['fp32_ce']}"
    for step, (low, full) in enumerate(zip(r["bf16_ce"], r["fp32_ce"])):
        assert low == pytest.approx(full, rel=BF16_LOSS_RTOL), f"{where}: step {step}: bf16 {low} vs fp32 {full}"
    assert r["bias_dtype"] == "torch.float32" and r["bias_moved"] > 0 and r["param_dtypes"] == ["torch.float32"]


@pytest.fixture
def one_thread():
    """Tiny matmuls: one thread is as fast on idle cores and far faster on busy ones (spinning OpenMP threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_single_process(one_thread):
    _check_accumulation(workers.accumulation_matches_one_batch(ParallelState()), "ep 1")
    _check_checkpointing(workers.checkpointing_matches_plain(ParallelState()), "ep 1")
    _check_bf16(workers.bf16_tracks_fp32(ParallelState()), "ep 1")


def test_two_ranks():
    results = run_on_ranks(workers.parallel_checks, 2, timeout=110)
    for rank, r in enumerate(results):
        for ep, accum in r["accum"].items():
            _check_accumulation(accum, f"rank {rank}, ep {ep}")
        _check_checkpointing(r["checkpointing"], f"rank {rank}, ep 2")
        _check_bf16(r["bf16"], f"rank {rank}, ep 2")
        hidden = workers.model_config().hidden_size  # rows cross the all-to-all in bf16, half the fp32 bytes
        assert r["bf16"]["row_bytes"] == ([4 * hidden] * 3, [2 * hidden] * 3), r["bf16"]["row_bytes"]
    assert results[0]["bf16"]["bias_bytes"] == results[1]["bf16"]["bias_bytes"], "the bias differs between ranks"


def test_checkpointing_a_transformers_model(one_thread):
    """``--hf-model``: transformers' own block checkpointing, with the MoE layers replaying (dropping on)."""
    from moe_ep.activation_checkpointing import enable_activation_checkpointing
    from moe_ep.hf_model import expert_parallelize
    from moe_ep.model_moe import moe_layers, total_aux_loss
    from moe_ep.training.step import next_token_loss

    from .hf_tiny import tiny_model

    batch = torch.randint(0, 300, (4, 17), generator=torch.Generator().manual_seed(0))
    runs = []
    for checkpointing in (False, True):
        model = expert_parallelize(tiny_model("v3"), ParallelState(), expert_capacity_factor=1.0,
                                   protected_seq_frac=0.25, expert_balance_coef=0.01).train()
        if checkpointing:
            enable_activation_checkpointing(model)
        layers = moe_layers(model)
        keeps = [[] for _ in layers]
        for layer, calls in zip(layers, keeps):
            layer.dispatcher = workers._KeepRecorder(layer.dispatcher, calls)
        (next_token_loss(model, batch) + total_aux_loss(model)).backward()
        runs.append(dict(grads={n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                         stats=[layer.last_stats.as_dict() for layer in layers], keeps=keeps,
                         state=[(layer.forward_count, layer.pending_drop_forwards) for layer in layers]))
    plain, ckpt = runs
    assert sum(s["dropped_pairs"] for s in plain["stats"]) > 0
    # checkpointed: each layer dispatched in the forward and again, identically, in the recomputation
    assert [len(k) for k in plain["keeps"]] == [1, 1] and [len(k) for k in ckpt["keeps"]] == [2, 2]
    assert all(torch.equal(k[0], c[0]) and torch.equal(k[0], c[1]) for k, c in zip(plain["keeps"], ckpt["keeps"]))
    assert ckpt["stats"] == plain["stats"] and ckpt["state"] == plain["state"] == [(1, 1), (1, 1)]
    assert plain["grads"].keys() == ckpt["grads"].keys()
    assert all(torch.equal(plain["grads"][n], ckpt["grads"][n]) for n in plain["grads"])


def test_checkpointed_forwards_replay_their_own_drop_steps(one_thread):
    """Two forwards (drop steps 0 and 1), then one backward: each recomputation replays its own forward."""
    from moe_ep.models import MoETransformerLM
    from moe_ep.training.step import next_token_loss

    batches = workers.batches(workers.train_config(batch_size=4), 0, 1, 2)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(1)  # router noise
        model = MoETransformerLM(workers.model_config(**workers.DROPPING_MOE)).train()
        model.activation_checkpointing = checkpointing
        loss = next_token_loss(model, batches[0]) + next_token_loss(model, batches[1])
        assert [layer.pending_drop_forwards for layer in moe_layers(model)] == [2, 2, 2]
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
