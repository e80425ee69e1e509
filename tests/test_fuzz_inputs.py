"""Fuzz: bad configs, launcher flags and layer inputs end in a named error, never a crash or a hang.

Three seeded passes, each case bounded in time:

* every ``MoEConfig`` field (from ``dataclasses.fields``, so a new field is
  fuzzed too) given values of a wrong type and out of range, plus random
  combinations of the fields that constrain each other;
* every flag of launch/train.py, launch/ds_train.py and launch/distill.py
  (from their parsers) given bad values, through ``parse_args`` and the
  checks it makes before any work;
* ``MoELayer`` inputs: wrong hidden sizes and dtypes, NaN and Inf under
  ``check_finite``, and the valid edge cases (empty batch, one token,
  non-contiguous, float64, random shapes) against a reference.

Each case ends as *caught* (``ValueError`` naming the field, or exit status 2
naming the flag, or a layer error naming the layer and the problem),
*accepted* (a valid value: an accepted config then runs a forward, an
accepted flag value is in ``VALID_FLAG_VALUES``, an accepted input gives the
reference's result), a *crash* (any other exception, or a bad value accepted)
or a *hang* (over ``CASE_SECONDS``). Every test asserts no crash and no hang
and prints its counts (docs/reliability.md lists them).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import io
import random
import time
import typing
from pathlib import Path

import pytest
import torch

from moe_ep import MoEConfig, MoELayer

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[1]
SEED = 26
CASE_SECONDS = 10.0


@dataclasses.dataclass
class Tally:
    """Outcomes of the cases of one pass; ``run`` classifies one case."""

    name: str
    caught: int = 0
    accepted: int = 0
    crashes: list = dataclasses.field(default_factory=list)
    hangs: list = dataclasses.field(default_factory=list)

    @property
    def tried(self) -> int:
        return self.caught + self.accepted + len(self.crashes)

    def run(self, label: str, case) -> None:
        """``case()`` returns ``"caught"`` or ``"accepted"``; anything it raises is a crash."""
        start = time.monotonic()
        try:
            outcome = case()
        except Exception as exc:  # noqa: BLE001 - every other exception is what this pass counts
            outcome = f"{type(exc).__name__}: {exc}"
        if outcome == "caught":
            self.caught += 1
        elif outcome == "accepted":
            self.accepted += 1
        else:
            self.crashes.append(f"{label}: {outcome}")
        if time.monotonic() - start > CASE_SECONDS:
            self.hangs.append(label)

    def report(self) -> None:
        print(f"\n{self.name}: {self.tried} tried, {self.caught} caught with a named error, {self.accepted} "
              f"accepted (valid), {len(self.crashes)} crashes, {len(self.hangs)} hangs")
        assert not self.crashes, "\n".join(self.crashes)
        assert not self.hangs, self.hangs


# ------------------------------------------------------------------ MoEConfig
TINY = dict(hidden_size=16, moe_intermediate_size=8, n_routed_experts=8, num_experts_per_tok=2)
# candidates for a wrong type; each field gets those its annotation does not admit (``_admits``)
TYPE_CANDIDATES = ["8", 8.5, True, None, [8], 1]
RANGE_CANDIDATES = {int: [0, -1], float: [-1.0, float("nan"), float("inf"), -float("inf")],
                    str: ["", "no-such-choice"], bool: []}


def _annotation(field: dataclasses.Field) -> tuple[type, bool]:
    hint = typing.get_type_hints(MoEConfig)[field.name]
    args = typing.get_args(hint)
    if type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return hint, False


def _admits(kind: type, optional: bool, value) -> bool:
    """The field's type, as its annotation means it: a bool is no number, an int is a valid float."""
    if value is None:
        return optional
    if isinstance(value, bool) or kind is bool:
        return kind is bool and isinstance(value, bool)
    return isinstance(value, (int, float)) if kind is float else isinstance(value, kind)


def _config_case(values: dict, named: set, must_refuse: bool):
    def case() -> str:
        try:
            config = MoEConfig(**{**TINY, **values})
        except ValueError as exc:
            field = str(exc).split(":")[0].removeprefix("MoEConfig.")
            if field not in named:
                return f"ValueError naming {field!r}, not one of {sorted(named)}: {exc}"
            return "caught"
        if must_refuse:
            return f"accepted a wrong type: {values}"
        layer = MoELayer(config)  # a value it accepts must work
        y = layer(torch.randn(2, 3, config.hidden_size))
        return "accepted" if y.shape == (2, 3, config.hidden_size) and torch.isfinite(y).all() else "bad output"
    return case


def test_fuzz_moe_config_fields():
    tally, rng = Tally("MoEConfig fields"), random.Random(SEED)
    for field in dataclasses.fields(MoEConfig):
        kind, optional = _annotation(field)
        for value in TYPE_CANDIDATES:
            if not _admits(kind, optional, value):
                tally.run(f"{field.name}={value!r}", _config_case({field.name: value}, {field.name}, True))
        for value in RANGE_CANDIDATES[kind]:
            tally.run(f"{field.name}={value!r}", _config_case({field.name: value}, {field.name}, False))
    # combinations of the fields that constrain each other (divisibility, top-k reach, group scores)
    linked = dict(n_routed_experts=range(1, 13), num_experts_per_tok=range(1, 7), n_group=range(1, 7),
                  topk_group=range(1, 7), group_score_topk=[None, *range(1, 5)], device_groups=[None, *range(1, 7)],
                  topk_method=["greedy", "device_limited", "node_limited"])
    for _ in range(80):
        values = {name: rng.choice(list(options)) for name, options in linked.items()}
        tally.run(f"combination {values}", _config_case(values, set(linked), False))
    tally.report()
    assert tally.caught > 100 and tally.accepted > 5  # the pass exercised both outcomes


# ------------------------------------------------------------------ launcher flags
LAUNCHERS = {"train": "launch/train.py", "ds_train": "launch/ds_train.py", "distill": "launch/distill.py"}
MOE_CANDIDATES = ["x", "nosuch=1", "hidden_size=abc", "hidden_size=7", "n_routed_experts=0", "n_group=3",
                  "num_experts_per_tok=0", "expert_backend=cuda"]
# (flag, candidate) pairs that are valid: accepting them is right ("FILE": an existing text file, "MISSING": a
# path that does not exist yet)
VALID_FLAG_VALUES = {("--warmup", "0"), ("--ckpt-every", "0"), ("--seed", "0"), ("--min-lr-ratio", "0"),
                     ("--weight-decay", "0"), ("--grad-clip", "0"), ("--alpha", "0"), ("--hidden-weight", "0"),
                     ("--attention-weight", "0"), ("--relation-weight", "0"), ("--eplb-interval", "0"),
                     ("--mtp-depth", "0"), ("--mtp-weight", "0"), ("--data", "FILE"), ("--out", "MISSING")}


def _load_launcher(name: str, monkeypatch):
    if name == "ds_train":
        pytest.importorskip("deepspeed")
        monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # what ds_train sets on a CPU machine, undone after the test
        monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))  # keeps this process's threads
    monkeypatch.syspath_prepend(str(REPO / "launch"))
    spec = importlib.util.spec_from_file_location(f"fuzz_{name}", REPO / LAUNCHERS[name])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _candidates(action) -> list:
    if action.choices is not None:
        return ["no-such-choice"]
    if action.nargs == 0:  # store_true: takes no value
        return ["=x"]
    if action.dest == "moe":
        return MOE_CANDIDATES
    kind = getattr(action.type, "__name__", "str")
    if kind in ("int", "positive_int", "non_negative_int"):
        return ["x", "1.5", "-1", "0"]
    if kind in ("float", "finite_float"):
        return ["x", "nan", "inf", "-1", "0"]
    return ["MISSING", "FILE"]  # a path


def _without_rivals(base: list, parser, action) -> list:
    """``base`` without the flags (and their values) of ``action``'s mutually exclusive group."""
    rivals = {other.option_strings[0] for group in parser._mutually_exclusive_groups if action in group._group_actions
              for other in group._group_actions if other is not action}
    return [arg for i, arg in enumerate(base) if arg not in rivals and (i == 0 or base[i - 1] not in rivals)]


def _flag_case(module, base: list, flag: str, value, paths: dict):
    given = [f"{flag}{value}"] if value == "=x" else [flag] if value is None else [flag, paths.get(value, value)]
    argv = base + given

    def case() -> str:
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                module.parse_args(argv)
        except SystemExit as exc:
            message = stderr.getvalue()
            if exc.code == 2 and f"argument {flag}:" in message and "Traceback" not in message:
                return "caught"
            return f"exit {exc.code}: {message.strip().splitlines()[-1:]}"
        return "accepted" if (flag, value) in VALID_FLAG_VALUES else f"accepted a bad value: {argv}"
    return case


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_fuzz_launcher_flags(launcher, tmp_path, monkeypatch):
    module = _load_launcher(launcher, monkeypatch)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    text_file = tmp_path / "corpus.txt"
    text_file.write_text("some text to train on\n" * 50)
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text("{}")  # a transformers folder, as far as parse_args looks
    paths = {"MISSING": str(tmp_path / "missing" / "sub"), "FILE": str(text_file)}
    base = {"train": [], "ds_train": ["--deepspeed_config", str(REPO / "launch/ds_config.json")],
            "distill": ["--teacher", str(teacher), "--student-preset", "tiny"]}[launcher] + ["--out", str(tmp_path)]
    parser = module.build_parser()
    module.parse_args(base)  # the base is valid
    tally = Tally(f"{LAUNCHERS[launcher]} flags")
    for action in parser._actions:
        deepspeed_own = getattr(action.container, "title", None) == "DeepSpeed" and action.dest != "deepspeed_config"
        if action.dest == "help" or action.help == argparse.SUPPRESS or deepspeed_own:
            continue  # argparse's -h, the deepspeed launcher's --local_rank, DeepSpeed's own flags
        flag = action.option_strings[0]
        for value in _candidates(action):
            tally.run(f"{flag} {value}", _flag_case(module, _without_rivals(base, parser, action), flag, value, paths))
    if launcher == "ds_train":
        tally.run("--resume without a checkpoint", _flag_case(module, base, "--resume", None, paths))
    tally.report()


# ------------------------------------------------------------------ layer inputs
LAYER = dict(hidden_size=16, moe_intermediate_size=8, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
             check_finite=True)


def _refused(layer, x, *needles):
    """The layer raises a ValueError whose message holds every needle."""
    def case() -> str:
        try:
            layer(x)
        except ValueError as exc:
            missing = [n for n in needles if n not in str(exc)]
            return "caught" if not missing else f"ValueError without {missing}: {exc}"
        return f"accepted {tuple(x.shape)} {x.dtype}"
    return case


def _matches(layer, x, reference, atol=1e-6):
    def case() -> str:
        y = layer(x)
        want = reference()
        ok = y.shape == x.shape and y.dtype == x.dtype and torch.allclose(y.double(), want.double(), atol=atol)
        return "accepted" if ok else f"differs from the reference: {tuple(x.shape)} {x.dtype}"
    return case


def test_fuzz_layer_inputs():
    tally, rng = Tally("MoELayer inputs"), torch.Generator().manual_seed(SEED)
    layer = MoELayer(MoEConfig(**LAYER), name="fuzz").eval()
    named = "MoELayer 'fuzz'"
    x = torch.randn(3, 5, 16, generator=rng)
    batch = layer(x).detach()
    for hidden in (0, 1, 15, 17, 32):
        tally.run(f"hidden {hidden}", _refused(layer, torch.randn(2, hidden), named, "expected input [..., 16]"))
    tally.run("0-dim", _refused(layer, torch.tensor(1.0), named, "expected input"))
    dtypes = [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64,
              *(d for d in (getattr(torch, "float8_e4m3fn", None),) if d is not None)]
    for dtype in dtypes:
        tally.run(f"dtype {dtype}", _refused(layer, torch.ones(2, 16, dtype=dtype), named, str(dtype)))
    for backend in ("torch", "triton") if importlib.util.find_spec("triton") else ("torch",):
        forced = MoELayer(MoEConfig(**LAYER, expert_backend=backend), name="fuzz").double()
        tally.run(f"float64 on {backend}", _refused(forced, torch.randn(2, 16, dtype=torch.float64),
                                                   f"expert_backend '{backend}'", "not torch.float64"))
    for where, value in (((1, 2, 3), float("nan")), ((0, 0, 0), float("inf")), ((2, 4, 15), -float("inf"))):
        bad = x.clone()
        bad[where] = value
        tally.run(f"{value} at {where}", _refused(layer, bad, named, "NaN or Inf in input"))
    tally.run("all NaN", _refused(layer, torch.full((2, 16), float("nan")), named, "NaN or Inf in input"))

    for shape in ((0, 16), (0, 5, 16), (3, 0, 16), (1, 0, 2, 16)):
        tally.run(f"empty {shape}", _matches(layer, torch.randn(shape), lambda s=shape: torch.zeros(s)))
    tally.run("one token [16]", _matches(layer, x[1, 2], lambda: batch[1, 2]))
    tally.run("one token [1, 16]", _matches(layer, x[1, 2:3], lambda: batch[1, 2:3]))
    tally.run("one sequence [1, 5, 16]", _matches(layer, x[1:2], lambda: batch[1:2]))
    wide = torch.randn(3, 5, 32, generator=rng)
    for label, strided in (("transposed", x.transpose(0, 1)), ("every other column", wide[..., ::2]),
                           ("expanded", x[0, :1].expand(4, 16)), ("reversed rows", x.flip(1)[:, ::2])):
        assert not strided.is_contiguous()
        tally.run(label, _matches(layer, strided, lambda s=strided: layer(s.contiguous())))
    double = MoELayer(MoEConfig(**LAYER), name="fuzz").double().eval()
    double.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in layer.state_dict().items()})
    tally.run("float64, auto", _matches(double, x.double(), lambda: batch, atol=1e-5))
    for dtype in (torch.bfloat16, torch.float16):
        tally.run(f"{dtype} input", _matches(layer, x.to(dtype), lambda d=dtype: batch.to(d), atol=0.25))
    for i in range(30):  # random shapes, a third of them with a wrong hidden size
        dims = torch.randint(0, 4, (int(torch.randint(0, 4, (1,), generator=rng)),), generator=rng).tolist()
        hidden = 16 if i % 3 else int(torch.randint(17, 40, (1,), generator=rng))
        sample = torch.randn(*dims, hidden, generator=rng)
        if hidden == 16:
            tally.run(f"random {tuple(sample.shape)}",
                      _matches(layer, sample, lambda s=sample: layer(s.reshape(-1, 16)).reshape(s.shape)))
        else:
            tally.run(f"random {tuple(sample.shape)}", _refused(layer, sample, named, "expected input [..., 16]"))
    tally.report()
