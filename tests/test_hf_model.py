"""A whole transformers DeepSeek model made expert-parallel (moe_ep/hf_model.py), trained and saved back.

* One spawn of 4 gloo ranks checks V2 and V3 at ep 2 (dp 2) and ep 4: the
  logits equal the untouched model's; after one training step the
  gradients of every non-expert parameter and of every (gathered) expert
  equal those of the untouched model whose loss has moe_ep's aux loss added
  (computed by single-process twins of its blocks that share its router
  weights); ``hf_state_dict`` gathers exactly the original weights; the V3
  bias update matches the twins'.
* One process: conversion keeps logits and ``generate``; ``save_pretrained``
  then ``from_pretrained`` keeps the logits; bad input raises naming the
  problem and leaves the model untouched.
* The launchers: ``train.py --hf-model`` (torchrun, ep 2, V2 with a tokenizer
  of 120 tokens) and ``ds_train.py --hf-model`` (DeepSpeed ZeRO-1, ep 2, V3 on
  bytes) lower the validation loss, and the ``--save-hf`` folder loaded on
  one process reproduces the sharded model's final validation loss.
"""
import copy
import json
import sys

import pytest
import torch

from moe_ep.parallel.spawn import run_on_ranks

from .hf_tiny import tiny_config, tiny_model, tiny_tokenizer

transformers = pytest.importorskip("transformers")

# Coefficients large enough that the aux loss moves the router gradients visibly.
AUX = {"v2": dict(expert_balance_coef=0.1, device_balance_coef=0.1, comm_balance_coef=0.1),
       "v3": dict(seq_balance_coef=0.1, z_loss_coef=0.01)}
GRAD_TOL = 2e-5   # max |g - g_ref| / max |g_ref| per tensor, fp32 sums in another order
LOGIT_TOL = 1e-5


def _reference_loss(model, batch, overrides):
    """The untouched model's next-token loss plus moe_ep's aux loss of its own routing; and the twins.

    Each transformers MoE block gets a single-process twin (``from_hf_moe``)
    whose router weight *is* the block's gate weight and which sees the
    block's input (forward hook, output discarded): its aux loss is a
    function of the untouched model's parameters only.
    """
    from moe_ep.hf_model import HF_MOE_BLOCK_NAMES
    from moe_ep.interop import from_hf_moe
    from moe_ep.training.step import next_token_loss

    twins, hooks = [], []
    for block in [m for m in model.modules() if type(m).__name__ in HF_MOE_BLOCK_NAMES]:
        twin = from_hf_moe(block, model.config, **overrides).train(model.training)
        twin.router.weight = block.gate.weight

        def run_twin(module, args, output, twin=twin):
            twin(args[0])  # returns None: the block's output is kept

        hooks.append(block.register_forward_hook(run_twin))
        twins.append(twin)
    loss = next_token_loss(model, batch) + sum(twin.aux_loss for twin in twins)
    for hook in hooks:
        hook.remove()
    return loss, twins


def _transformers_named_grads(model, parallel):
    """Gradients of an expert-parallel model under the untouched model's parameter names, experts gathered."""
    from moe_ep.hf_model import ExpertParallelMoE
    from moe_ep.interop import to_hf_keys

    blocks = {name: m for name, m in model.named_modules() if isinstance(m, ExpertParallelMoE)}
    prefixes = tuple(name + "." for name in blocks)
    grads = {name: p.grad for name, p in model.named_parameters() if not name.startswith(prefixes)}
    for prefix, block in blocks.items():
        state = {name: parallel.all_gather_ep(p.grad) if name.startswith("experts.") else p.grad
                 for name, p in block.moe.named_parameters()}
        grads.update({f"{prefix}.{key}": g for key, g in to_hf_keys(state, block.moe.config).items()})
    return grads


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def _parity_worker(rank: int, world: int) -> list[dict]:
    import moe_ep
    from moe_ep.hf_model import expert_parallelize, hf_state_dict
    from moe_ep.model_moe import moe_layers, total_aux_loss, update_moe_bias
    from moe_ep.gradients import sync_gradients
    from moe_ep.training.step import next_token_loss

    results = []
    for ep in (2, 4):
        parallel = moe_ep.init_expert_parallel(ep_size=ep)
        for kind in ("v2", "v3"):
            overrides = dict(AUX[kind], device_groups=ep)
            batch = torch.randint(0, 300, (2 * world, 11), generator=torch.Generator().manual_seed(ep))
            mine = batch[2 * rank:2 * rank + 2]
            reference = tiny_model(kind)
            model = expert_parallelize(copy.deepcopy(reference), parallel, **overrides)
            with torch.no_grad():
                want_logits = reference(batch[:, :-1]).logits[2 * rank:2 * rank + 2]
                got_logits = model(mine[:, :-1]).logits
            saved = hf_state_dict(model)
            state_equal = saved.keys() == reference.state_dict().keys() and all(
                torch.equal(saved[k], v) for k, v in reference.state_dict().items())

            reference.train()
            ref_loss, twins = _reference_loss(reference, batch, overrides)
            ref_loss.backward()
            model.train()
            aux = total_aux_loss(model)
            (next_token_loss(model, mine) + total_aux_loss(model)).backward()
            sync_gradients(model, parallel)
            want = {name: p.grad for name, p in reference.named_parameters()}
            got = _transformers_named_grads(model, parallel)
            errors = {name: _relative_error(got[name], want[name]) for name in want if name in got}

            bias_before = [layer.router.e_score_correction_bias.clone() for layer in moe_layers(model)
                           if layer.config.aux_free_bias]
            update_moe_bias(model)
            for twin in twins:
                twin.update_bias()
            bias_equal = all(torch.equal(layer.router.e_score_correction_bias, twin.router.e_score_correction_bias)
                             for layer, twin in zip(moe_layers(model), twins)) if kind == "v3" else None
            results.append(dict(
                ep=ep, kind=kind, logit_error=_relative_error(got_logits, want_logits), state_equal=state_equal,
                missing=sorted(set(want) ^ set(got)), errors=errors, aux=float(aux),
                twin_aux=float(sum(t.aux_loss for t in twins)), bias_equal=bias_equal,
                bias_moved=any(not torch.equal(before, layer.router.e_score_correction_bias)
                               for before, layer in zip(bias_before, moe_layers(model))),
                n_blocks=len(moe_layers(model)), local_experts=moe_layers(model)[0].experts.w_in.shape[0]))
    return results


@pytest.mark.timeout(240)
def test_expert_parallel_model_matches_untouched_model_at_ep2_and_ep4():
    results = run_on_ranks(_parity_worker, 4, timeout=220)
    for rank, rank_results in enumerate(results):
        assert [(r["ep"], r["kind"]) for r in rank_results] == [(2, "v2"), (2, "v3"), (4, "v2"), (4, "v3")]
        for r in rank_results:
            case = f"rank {rank} {r['kind']} ep {r['ep']}"
            experts = 8 if r["kind"] == "v2" else 16
            assert r["n_blocks"] == 2 and r["local_experts"] == experts // r["ep"], case
            assert r["logit_error"] < LOGIT_TOL, (case, r["logit_error"])
            assert r["state_equal"], f"{case}: hf_state_dict differs from the untouched model's state_dict"
            assert not r["missing"], (case, r["missing"])
            worst = max(r["errors"], key=r["errors"].get)
            assert r["errors"][worst] < GRAD_TOL, (case, worst, r["errors"][worst])
            assert r["aux"] > 1e-2 and r["aux"] == pytest.approx(r["twin_aux"], rel=1e-5), case
            if r["kind"] == "v3":
                assert r["bias_equal"] and r["bias_moved"], case


# ---------------------------------------------------------------- one process
@pytest.mark.parametrize("kind", ["v2", "v3"])
def test_single_process_conversion_generation_and_save(kind, tmp_path):
    from moe_ep import ParallelState
    from moe_ep.hf_model import ExpertParallelMoE, expert_parallelize, save_pretrained

    reference = tiny_model(kind)
    model = expert_parallelize(copy.deepcopy(reference), ParallelState(), bias_update_rate=0.0)
    assert isinstance(model.model.layers[1].mlp, ExpertParallelMoE)
    assert type(model.model.layers[0].mlp).__name__.endswith("MLP")  # the dense layer is the model's own
    ids = torch.randint(0, 300, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference(ids).logits
        torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=LOGIT_TOL)
        if kind == "v3":  # generation (KV cache, one token per step) runs through the replaced blocks
            prompt = dict(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=3,
                          do_sample=False)
            assert torch.equal(model.generate(**prompt), reference.generate(**prompt))
    save_pretrained(model, str(tmp_path))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want, rtol=0, atol=LOGIT_TOL)


def test_bad_input_names_the_problem_and_leaves_the_model_untouched():
    from moe_ep import ParallelState
    from moe_ep.hf_model import expert_parallelize

    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="LlamaForCausalLM has no DeepSeek MoE block"):
        expert_parallelize(llama, ParallelState())

    model = tiny_model("v2")  # 8 experts
    with pytest.raises(ValueError, match="8 routed experts are not divisible by ep_size=3"):
        expert_parallelize(model, ParallelState(ep_size=3, dp_size=1))
    with pytest.raises(ValueError, match=r"\['n_group', 'routed_scaling_factor'\] come from the transformers"):
        expert_parallelize(model, ParallelState(), routed_scaling_factor=2.0, n_group=2)

    # transformers 4.x stored one Linear per expert: give the *second* block that layout.
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2MLP
    old_layout = model.model.layers[2].mlp
    old_layout.experts = torch.nn.ModuleList(DeepseekV2MLP(model.config, intermediate_size=16) for _ in range(8))
    with pytest.raises(ValueError, match=r"does not have the layout .* missing \['experts.down_proj', "
                                         r"'experts.gate_up_proj'\], unexpected \['experts.0.down_proj.weight'"):
        expert_parallelize(model, ParallelState())
    assert all(type(layer.mlp).__name__ != "ExpertParallelMoE" for layer in model.model.layers)

    # A block whose forward returns (hidden, router_logits), as some versions' MoE blocks do.
    model = tiny_model("v3")
    block = model.model.layers[1].mlp
    original_forward = block.forward
    block.forward = lambda hidden_states: (original_forward(hidden_states), None)
    with pytest.raises(ValueError, match="returns tuple for hidden states"):
        expert_parallelize(model, ParallelState())


# ---------------------------------------------------------------- launchers
STEPS, BATCH, SEQ, VAL_BATCHES, DATA_BYTES = 30, 4, 64, 2, 300_000
LAUNCH_FLAGS = ["--ep-size", "2", "--steps", str(STEPS), "--seq-len", str(SEQ), "--warmup", "5", "--log-every", "10",
                "--val-every", str(STEPS), "--val-batches", str(VAL_BATCHES), "--max-data-bytes", str(DATA_BYTES)]


def _check_run_and_saved_model(out, saved, vocab_size):
    """The run lowered the validation loss; the saved folder reproduces its final value on one process."""
    from moe_ep import ParallelState
    from moe_ep.data import BatchSampler
    from moe_ep.training.driver import evaluate
    from moe_ep.training.model_source import hf_corpus

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    assert sorted(val) == [0, STEPS] and val[STEPS] < val[0] - 0.3, val  # seen: V2 5.17 -> 4.58, V3 6.21 -> 3.82
    assert all(len(r["expert_load"]) == 2 for r in records if "expert_load" in r)  # both MoE layers reported
    assert json.loads((out / "run.json").read_text())["model"]["moe_overrides"]

    loaded = transformers.AutoModelForCausalLM.from_pretrained(saved)
    assert loaded.config.vocab_size == vocab_size
    corpus, tokenizer = hf_corpus(str(saved), vocab_size, None, DATA_BYTES)
    assert (tokenizer is not None) == (vocab_size < 256)
    batches = [b for rank in (0, 1)
               for b in BatchSampler(corpus, BATCH, SEQ, 0, rank, world_size=2).val_batches(VAL_BATCHES)]
    assert evaluate(loaded, batches, ParallelState()) == pytest.approx(val[STEPS], rel=1e-5)


@pytest.mark.timeout(200)
def test_train_py_hf_model_with_tokenizer_then_save_hf(tmp_path):
    from .test_train_torchrun import finish, start_torchrun

    folder = tmp_path / "v2"
    tiny_model("v2", vocab_size=120).save_pretrained(folder)
    tiny_tokenizer(120).save_pretrained(folder)
    out, saved = tmp_path / "run", tmp_path / "saved"
    log = tmp_path / "torchrun.log"
    finish(start_torchrun(["--hf-model", str(folder), *LAUNCH_FLAGS, "--batch-size", str(BATCH), "--lr", "3e-3",
                           "--moe", "expert_balance_coef=0.01", "--out", str(out), "--save-hf", str(saved)], log),
           log, timeout=180)
    _check_run_and_saved_model(out, saved, vocab_size=120)


@pytest.mark.timeout(300)
def test_ds_train_py_hf_model_on_bytes_then_save_hf(tmp_path, monkeypatch):
    pytest.importorskip("deepspeed")
    from .test_deepspeed import ROOT, _free_port, _run

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    folder = tmp_path / "v3"
    tiny_model("v3").save_pretrained(folder)
    config = json.loads((ROOT / "launch" / "ds_config.json").read_text())
    config["train_micro_batch_size_per_gpu"] = BATCH
    (tmp_path / "ds_config.json").write_text(json.dumps(config))
    out, saved = tmp_path / "run", tmp_path / "saved"
    _run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(_free_port()),
          "launch/ds_train.py", "--deepspeed_config", str(tmp_path / "ds_config.json"), "--hf-model", str(folder),
          *LAUNCH_FLAGS, "--moe", "seq_balance_coef=0.01", "--out", str(out), "--save-hf", str(saved)], timeout=280)
    _check_run_and_saved_model(out, saved, vocab_size=300)
