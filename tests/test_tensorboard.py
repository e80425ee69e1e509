"""TensorBoardLog: the event files hold exactly the records' values at their steps; disabled writes nothing;
enabled without the tensorboard package fails naming the flag and the fix."""
import sys

import numpy as np
import pytest

from moe_ep.training.tensorboard import TensorBoardLog

pytestmark = pytest.mark.timeout(60)

LOAD = [[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]]  # 2 MoE layers x 4 experts
RECORDS = [
    dict(step=0, val_loss=5.5, teacher_val_loss=1.75),
    dict(step=10, loss=4.1, aux_loss=0.0123, tokens_per_s=1234.5, dropped_frac=0.125, routed_pairs=800,
         processed_pairs=700, dropped_pairs=100, max_vio=1.0, grad_norm=0.75, skipped_steps=0, lr=3e-4,
         expert_load=LOAD, distill_loss=2.5),
    dict(step=20, loss=3.9, aux_loss=0.011, tokens_per_s=1500.0, dropped_frac=0.0, routed_pairs=800,
         processed_pairs=800, dropped_pairs=0, max_vio=0.5, grad_norm=float("nan"), skipped_steps=2, lr=1e-4,
         expert_load=LOAD[::-1], distill_loss=2.25, val_loss=4.0),
]


def _expected_scalars() -> dict[str, list[tuple[int, float]]]:
    tags = dict(loss="loss/train", val_loss="loss/val", aux_loss="loss/aux", distill_loss="loss/distill",
                teacher_val_loss="loss/teacher_val", tokens_per_s="throughput/tokens_per_s",
                dropped_frac="moe/dropped_frac", max_vio="moe/max_vio", routed_pairs="moe/routed_pairs",
                processed_pairs="moe/processed_pairs", dropped_pairs="moe/dropped_pairs", lr="optim/lr",
                grad_norm="optim/grad_norm", skipped_steps="optim/skipped_steps")
    expected: dict[str, list[tuple[int, float]]] = {}
    for r in RECORDS:
        for field, tag in tags.items():
            if field in r:
                expected.setdefault(tag, []).append((r["step"], r[field]))
        for layer, shares in enumerate(r.get("expert_load", [])):
            for expert, share in enumerate(shares):
                expected.setdefault(f"expert_load/layer{layer}/expert{expert}", []).append((r["step"], share * 4))
    return expected


def _float32(x: float) -> float:
    return float(np.float32(x))


def test_events_hold_every_record_value_at_its_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = TensorBoardLog(tmp_path / "tb", enabled=True)
    for record in RECORDS:
        log.write(record)
    log.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()

    expected = _expected_scalars()
    assert sorted(acc.Tags()["scalars"]) == sorted(expected)
    for tag, points in expected.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        want = [(step, _float32(v)) for step, v in points]  # TensorBoard scalars are float32
        assert np.array_equal(np.array(got), np.array(want), equal_nan=True), (tag, got, want)

    assert sorted(acc.Tags()["histograms"]) == ["expert_load/layer0", "expert_load/layer1"]
    for layer in range(2):
        events = acc.Histograms(f"expert_load/layer{layer}")
        assert [e.step for e in events] == [10, 20]
        for e, load in zip(events, (LOAD, LOAD[::-1])):
            ratios = np.array(load[layer]) * 4
            h = e.histogram_value
            assert (h.num, h.min, h.max) == (4, ratios.min(), ratios.max())
            assert h.sum == pytest.approx(ratios.sum()) and h.sum_squares == pytest.approx((ratios ** 2).sum())
            assert sum(h.bucket) == 4


def test_resumed_run_hides_the_earlier_events_after_its_start_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = TensorBoardLog(tmp_path / "tb", enabled=True)
    for step in (10, 20, 30):
        first.write(dict(step=step, loss=float(step)))
    first.close()
    resumed = TensorBoardLog(tmp_path / "tb", enabled=True, start_step=20)
    resumed.write(dict(step=30, loss=-30.0))
    resumed.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss/train")] == [(10, 10.0), (20, 20.0), (30, -30.0)]


def test_disabled_imports_and_creates_nothing_and_missing_package_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` now fails
    for name in [m for m in sys.modules if m.startswith("torch.utils.tensorboard")]:
        monkeypatch.delitem(sys.modules, name)

    log = TensorBoardLog(tmp_path / "tb", enabled=False)
    log.write(RECORDS[1])
    log.close()
    assert not (tmp_path / "tb").exists()
    assert "torch.utils.tensorboard" not in sys.modules

    with pytest.raises(ImportError, match=r"--tensorboard .*pip install moe_ep\[train\]"):
        TensorBoardLog(tmp_path / "tb", enabled=True)
    assert not (tmp_path / "tb").exists()
