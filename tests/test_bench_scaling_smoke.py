"""benchmarks/bench_scaling.py: a tiny weak-scaling run completes and its traffic and phase records hold."""
import json

import pytest


@pytest.mark.timeout(120)
def test_bench_scaling_tiny_run(tmp_path, bench_modules):
    import bench_scaling

    out = tmp_path / "scaling.json"
    bench_scaling.main(["--procs", "1", "2", "--modes", "weak", "--impls", "moe_ep", "moe_ep_2hop", "moe_ep_node_M1",
                        "--tokens", "32", "--hidden", "32", "--ffn", "16", "--iters", "1", "--warmup", "0",
                        "--json", str(out), "--timeout", "100"])
    records = {(r["impl"], r["procs"]): r for r in json.loads(out.read_text())["records"]}
    assert set(records) == {("moe_ep", 1), ("moe_ep", 2), ("moe_ep_2hop", 2), ("moe_ep_node_M1", 2)}
    K = records["moe_ep", 1]["top_k"]
    for r in records.values():
        assert r["step_ms"] > 0 and 0 <= r["share_comm"] <= 1 and 0 <= r["share_experts"] <= 1
        assert r["share_comm"] + r["share_experts"] + r["share_rest"] == pytest.approx(1)
        assert r["remote_rows_per_token"] <= min(K, r["procs"] - 1) + 1e-9  # one row per other rank at most
    assert records["moe_ep", 1]["share_comm"] == 0 and records["moe_ep", 1]["remote_rows_per_token"] == 0
    assert records["moe_ep", 2]["share_comm"] > 0 and records["moe_ep", 2]["remote_rows_per_token"] > 0
    # Node-limited M = 1 with one rank per node: every token stays on its own node's experts or goes to one other.
    assert records["moe_ep_node_M1", 2]["internode_rows_per_token"] <= 1
    assert records["moe_ep_node_M1", 2]["internode_rows_per_token"] < records["moe_ep", 2]["internode_rows_per_token"]
    # Same weights and tokens: the two-hop dispatcher moves the same pairs across nodes as the flat one here.
    assert records["moe_ep_2hop", 2]["internode_rows_per_token"] == pytest.approx(
        records["moe_ep", 2]["internode_rows_per_token"])
