"""ft.compile: the whole iteration in one graph equals the eager step, never recompiles
with a schedule, interoperates with checkpoints and combinators, and falls back with a
reason when a loss function cannot be captured.

Compiling costs seconds on this CPU, so each compiled variant is built once (module
fixtures) and shared; the fallback tests fail while tracing, before any code generation.
"""

from __future__ import annotations

import csv
import glob
import json
import logging

import pytest
import torch
from helpers import Net, classify, make_batches
from torch import nn
from torch.nn import functional as F

import ftrain as ft
from ftrain import testing
from ftrain.compiling.step import CompiledStep
from ftrain.compiling.step import compile as ft_compile
from ftrain.core.layer import core as core_of
from ftrain.optim import schedules

OFF = {"logger": False, "checkpoint": False, "progress": False}
STEPS = 100


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


def loss_fn(model, batch):
    x, y = batch
    out = model(x)
    return F.cross_entropy(out, y), {"acc": (out.argmax(-1) == y).float().mean()}


def batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 32, generator=g), torch.randint(0, 10, (32,), generator=g))
            for _ in range(n)]


DATA = batches(STEPS)


def run(step, state, data, epochs: int = 1, **kw):
    """Train and return (final state, per-step losses)."""
    losses = []
    for state, metrics in ft.iterate(step, state, data, epochs=epochs, **kw):
        losses.append(metrics["loss"])
    return state, torch.stack(losses)


def max_diff(a, b) -> float:
    leaves_a = torch.utils._pytree.tree_leaves([a.params, a.buffers, a.opt_state])
    leaves_b = torch.utils._pytree.tree_leaves([b.params, b.buffers, b.opt_state])
    assert len(leaves_a) == len(leaves_b)
    return max(float((x.double() - y.double()).abs().max())
               for x, y in zip(leaves_a, leaves_b) if isinstance(x, torch.Tensor))


def adam_schedule():
    return ft.optim.adam(schedules.warmup_cosine(1e-2, 10, STEPS))


@pytest.fixture(scope="module")
def scheduled() -> CompiledStep:
    """The compiled core for the MLP with Adam on a warmup-cosine schedule."""
    return ft_compile(ft.train_step(loss_fn), fallback=False)


def fresh(optimizer=None) -> ft.TrainState:
    return ft.TrainState.create(mlp(), optimizer or adam_schedule(), seed=0)


# -- equality with the eager step; no recompiles -------------------------------------------

def test_100_steps_with_a_schedule_match_eager_without_recompiling(scheduled):
    from torch._dynamo.utils import counters

    compiled, c_losses = run(scheduled, fresh(), DATA[:1])  # compiles
    graphs = counters["stats"]["unique_graphs"]
    compiled, c_losses = run(scheduled, compiled, DATA, epochs=2)  # 100 more steps
    assert counters["stats"]["unique_graphs"] == graphs  # torch's own count agrees
    assert scheduled.compiles == 1  # the first call; schedule and count are tensors
    compiled, c_losses = run(scheduled, fresh(), DATA)
    eager, e_losses = run(ft.train_step(loss_fn), fresh(), DATA)
    assert scheduled.compiles == 1
    assert scheduled.fallback_reason is None
    assert compiled.step == eager.step == STEPS
    assert int(compiled.opt_state["count"]) == STEPS
    torch.testing.assert_close(c_losses, e_losses, rtol=1e-4, atol=1e-5)
    assert max_diff(compiled, eager) < 1e-4
    # the learning rate followed the schedule to its end
    lr = compiled.optimizer.learning_rates(compiled.opt_state)["adam"]
    assert float(lr) == pytest.approx(0.0, abs=1e-12)


def test_a_direct_call_is_pure_and_equals_the_eager_call(scheduled):
    state = fresh()
    batch = DATA[0]
    testing.assert_pure(scheduled, state, batch)
    new, metrics = scheduled(state, batch)
    eager, e_metrics = ft.train_step(loss_fn)(state, batch)
    assert new.step == 1 and state.step == 0
    assert sorted(metrics) == ["acc", "loss"]
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())
    torch.testing.assert_close(metrics, e_metrics)
    assert max_diff(new, eager) < 1e-6
    assert scheduled.compiles == 1  # pure and loop calls share the graph


def test_checkpoints_move_between_compiled_and_eager_runs(scheduled, tmp_path):
    first, second = DATA[:20], DATA[20:40]
    reference, _ = run(ft.train_step(loss_fn), fresh(), DATA[:40])

    compiled, _ = run(scheduled, fresh(), first)
    path = ft.save(tmp_path / "compiled.ckpt", compiled)
    saved = torch.load(path, weights_only=True)
    keys = [str(k) for k in torch.utils._pytree.tree_flatten_with_path(saved)[0]]
    assert not any("_orig_mod" in k for k in keys)
    resumed = ft.load(path, like=fresh())
    eager_after, _ = run(ft.train_step(loss_fn), resumed, second, epochs=2)  # one more
    assert max_diff(eager_after, reference) < 1e-4

    eager, _ = run(ft.train_step(loss_fn), fresh(), first)
    path = ft.save(tmp_path / "eager.ckpt", eager)
    compiled_after, _ = run(scheduled, ft.load(path, like=fresh()), second, epochs=2)
    assert max_diff(compiled_after, reference) < 1e-4
    assert scheduled.compiles == 1


def test_a_nan_loss_is_reported_at_epoch_end_naming_the_step(scheduled):
    data = [DATA[0], DATA[1], (torch.full((32, 32), float("nan")), DATA[2][1]), DATA[3]]
    with pytest.raises(ft.NonFiniteLossError, match="at step 2"):
        ft.fit(scheduled, fresh(), data, epochs=1, **OFF)


# -- inner combinators inside the graph, outer ones around it ------------------------------

def test_outer_combinators_and_accumulation_around_a_compiled_core(tmp_path):
    evaluator = ft.eval_step(loss_fn)
    val = batches(4, seed=1)

    def stack(core):
        step = ft.with_accumulation(core, 2)  # inside the graph: 2 micro-batches of 16
        step = ft.with_validation(step, evaluator, val)
        step = ft.with_checkpointing(step, str(tmp_path / type(core).__name__),
                                     monitor="val_loss", save_top_k=1)
        return ft.with_logging(step, ft.loggers.CSV(str(tmp_path / type(core).__name__)),
                               every_n_steps=10)

    built = stack(ft_compile(ft.train_step(loss_fn), fallback=False))
    core = core_of(built)  # the compiled core with accumulation set: a new value
    data = DATA[:30]
    compiled = ft.fit(built, fresh(ft.optim.adam(1e-2)), data, epochs=2, progress=False)
    eager = ft.fit(stack(ft.train_step(loss_fn)), fresh(ft.optim.adam(1e-2)), data,
                   epochs=2, progress=False)
    assert core.compiles == 1 and core.fallback_reason is None
    assert compiled.step == eager.step == 60
    assert max_diff(compiled, eager) < 1e-4
    folder = tmp_path / "CompiledStep"
    assert len(glob.glob(str(folder / "*.ckpt"))) >= 1
    (metrics_csv,) = glob.glob(str(folder / "**" / "metrics.csv"), recursive=True)
    with open(metrics_csv) as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("loss") for r in rows) and any(r.get("val_loss") for r in rows)


def test_bf16_autocast_inside_the_graph_tracks_eager():
    amp = ft.with_amp(ft_compile(ft.train_step(loss_fn), fallback=False), torch.bfloat16)
    compiled, c_losses = run(amp, fresh(), DATA)
    eager, e_losses = run(ft.with_amp(ft.train_step(loss_fn), torch.bfloat16), fresh(), DATA)
    assert core_of(amp).compiles == 1
    # bf16 roundings differ between fused and eager kernels; the runs stay together
    torch.testing.assert_close(c_losses, e_losses, rtol=0.03, atol=0.03)
    assert max_diff(compiled, eager) < 0.05


def test_fp16_loss_scaling_skips_overflowing_steps_as_eager_does():
    def step(core):
        return ft.with_amp(core, torch.float16, init_scale=2.0**30, growth_interval=3)

    opt = ft.optim.chain(ft.optim.clip_grad_norm(1.0), ft.optim.adam(1e-2))
    scaled = step(ft_compile(ft.train_step(loss_fn), fallback=False))
    compiled, _ = run(scaled, fresh(opt), DATA[:30])
    eager, _ = run(step(ft.train_step(loss_fn)), fresh(opt), DATA[:30])
    assert core_of(scaled).compiles == 1
    c, e = compiled.slots["amp"], eager.slots["amp"]
    assert int(c["skipped"]) == int(e["skipped"]) > 0  # the overflowing steps
    assert float(c["scale"]) == float(e["scale"])
    assert int(c["growth_tracker"]) == int(e["growth_tracker"])
    assert int(compiled.opt_state["count"]) == int(eager.opt_state["count"]) < 30
    assert max_diff(compiled, eager) < 1e-2


class CppWrapperEverywhere(CompiledStep):
    """Asks for inductor's C++ wrapper even where it fails (float16 loss scaling)."""

    def _cpp_wrapper(self, device, amp, key):
        return key not in self._python_wrapper


def test_a_graph_the_cpp_wrapper_cannot_compile_is_compiled_with_the_python_one(caplog):
    def step(core):
        return ft.with_amp(core, torch.float16, init_scale=2.0**30, growth_interval=3)

    forced = step(CppWrapperEverywhere(ft.train_step(loss_fn), "default", fullgraph=True,
                                       fallback=False, dynamic=False))
    with caplog.at_level(logging.INFO, logger="ftrain"):
        compiled, _ = run(forced, fresh(), DATA[:4])
    core = core_of(forced)
    assert type(core) is CppWrapperEverywhere
    assert core.compiles == 1 and core.fallback_reason is None  # the failed try: no graph
    assert len(core._python_wrapper) == 1
    assert any("Python wrapper" in r.getMessage() for r in caplog.records)
    eager, _ = run(step(ft.train_step(loss_fn)), fresh(), DATA[:4])
    assert int(compiled.slots["amp"]["skipped"]) == int(eager.slots["amp"]["skipped"]) > 0
    assert max_diff(compiled, eager) < 1e-2


def test_dropout_batchnorm_and_clipping_match_eager_exactly_seeded():
    opt = ft.optim.chain(ft.optim.clip_grad_norm(0.5), ft.optim.sgd(0.05, momentum=0.9))
    data = make_batches(20)

    def state():
        torch.manual_seed(0)
        return ft.TrainState.create(Net(), opt, seed=3)

    core = ft_compile(ft.train_step(classify), fallback=False)
    compiled, c_losses = run(core, state(), data)
    eager, e_losses = run(ft.train_step(classify), state(), data)
    assert core.compiles == 1
    # same dropout masks (seeded from (seed, step, rank)) and BatchNorm statistics
    torch.testing.assert_close(c_losses, e_losses, rtol=1e-5, atol=1e-6)
    assert max_diff(compiled, eager) < 1e-5
    assert int(compiled.buffers["bn.num_batches_tracked"]) == 20


# -- capture failures ----------------------------------------------------------------------

def branchy(model, batch):
    x, y = batch
    loss = F.cross_entropy(model(x), y)
    if loss.item() > 100.0:  # a Python decision on a tensor's value
        return loss * 0.0
    return loss


def test_fallback_logs_the_reason_and_runs_the_eager_step(caplog):
    step = ft_compile(ft.train_step(branchy))
    with caplog.at_level(logging.WARNING, logger="ftrain"):
        new, _ = step(fresh(), DATA[0])
    assert step.fallback_reason is not None and "branchy" in step.fallback_reason
    assert "control flow" in step.fallback_reason
    assert any("running the training step of branchy eagerly" in r.getMessage()
               for r in caplog.records)
    eager, _ = ft.train_step(branchy)(fresh(), DATA[0])
    assert max_diff(new, eager) == 0.0
    final = ft.fit(step, fresh(), DATA[:5], epochs=1, **OFF)  # a loop runs it eagerly too
    assert final.step == 5 and step.compiles == 0


def test_without_fallback_a_capture_failure_is_a_config_error_with_the_reason():
    step = ft_compile(ft.train_step(branchy), fallback=False)
    with pytest.raises(ft.ConfigError, match=r"(?s)cannot compile.*branchy.*control flow"):
        step(fresh(), DATA[0])


def test_an_optimizer_transform_without_a_capturable_path_falls_back(caplog):
    class Halve:  # a custom transform with only the eager apply
        name = "halve"

        def init(self, params):
            return {}

        def apply(self, params, state, count, found_inf):
            for p in params.values():
                p.grad.mul_(0.5)

    opt = ft.optim.chain(Halve(), ft.optim.sgd(0.1))
    with pytest.raises(ft.ConfigError, match="'halve'.*apply_capturable"):
        ft_compile(ft.train_step(loss_fn), fallback=False)(fresh(opt), DATA[0])
    step = ft_compile(ft.train_step(loss_fn))
    with caplog.at_level(logging.WARNING, logger="ftrain"):
        new, _ = step(fresh(opt), DATA[0])
    eager, _ = ft.train_step(loss_fn)(fresh(opt), DATA[0])
    assert "apply_capturable" in (step.fallback_reason or "")
    assert max_diff(new, eager) == 0.0 and step.compiles == 0


def test_a_loss_function_error_is_raised_as_itself():
    def not_scalar(model, batch):
        return model(batch[0])

    with pytest.raises(ft.LossError, match="0-d floating-point"):
        ft_compile(ft.train_step(not_scalar), fallback=False)(fresh(), DATA[0])


def test_configuration_errors_and_stacks():
    with pytest.raises(ft.ConfigError, match="mode"):
        ft_compile(ft.train_step(loss_fn), mode="fast")  # type: ignore[arg-type]
    with pytest.raises(ft.ConfigError, match="ft.train_step"):
        ft_compile(lambda state, batch: (state, {}))
    compiled = ft_compile(ft.train_step(loss_fn))
    with pytest.raises(ft.ConfigError, match="compiled already"):
        ft_compile(compiled)
    # a new stack comes back around a compiled core; inner options stay on the core, and
    # the stack given is unchanged
    stack = ft.with_logging(ft.with_amp(ft.train_step(loss_fn), torch.bfloat16), [])
    eager = core_of(stack)
    out = ft_compile(stack, mode="reduce-overhead")
    assert out is not stack and core_of(stack) is eager and type(eager) is ft.TrainStep
    core = core_of(out)
    assert isinstance(core, CompiledStep) and core.mode == "reduce-overhead"
    assert core.phases.amp is eager.phases.amp
    assert repr(core) == "compile(train_step(loss_fn), mode='reduce-overhead')"


# -- the per-step path: dynamo's guards, without its frame hook ------------------------------

SCALE = 1.0  # a global the loss below reads: dynamo guards on its value


def scaled_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y) * SCALE


def more(step, state, data):
    """One more epoch over `data`, continuing `state`."""
    return run(step, state, data, epochs=state.epoch + 1)


def direct_calls(core: CompiledStep) -> int:
    return sum(getattr(fn, "direct_calls", 0) for fn, _ in core._fns.values())


def test_steady_state_steps_skip_the_frame_hook_and_keep_every_guard():
    global SCALE
    core = ft_compile(ft.train_step(scaled_loss), fallback=False)
    eager_step = ft.train_step(scaled_loss)
    compiled, c_losses = run(core, fresh(), DATA[:10])
    eager, e_losses = run(eager_step, fresh(), DATA[:10])
    assert core.compiles == 1 and direct_calls(core) == 9  # all but the compiling call
    torch.testing.assert_close(c_losses, e_losses, rtol=1e-4, atol=1e-5)

    (fn, _), = core._fns.values()
    assert fn.enabled  # the check of the entry just compiled agreed with dynamo's
    fn.enabled = False  # the same steps through torch.compile's hook: the same graph
    through_hook, h_losses = more(core, compiled.copy(), DATA[10:15])
    fn.enabled = True
    direct, d_losses = more(core, compiled.copy(), DATA[10:15])
    assert torch.equal(h_losses, d_losses) and max_diff(through_hook, direct) == 0.0
    assert direct_calls(core) == 14

    eager, _ = more(eager_step, eager, DATA[10:15])
    SCALE = 3.0  # guarded (the loss function's globals are): the next step recompiles
    try:
        compiled, c_losses = more(core, direct, DATA[15:19])
        eager, e_losses = more(eager_step, eager, DATA[15:19])
    finally:
        SCALE = 1.0
    assert core.compiles == 2 and direct_calls(core) == 17
    torch.testing.assert_close(c_losses, e_losses, rtol=1e-4, atol=1e-5)
    assert max_diff(compiled, eager) < 1e-4

    with torch.compiler.set_stance("force_eager"):  # the stance is honoured: no graph
        compiled, _ = more(core, compiled, DATA[19:21])
    assert direct_calls(core) == 17 and core.compiles == 2


def test_a_smaller_last_batch_compiles_one_more_graph_and_the_first_is_kept():
    core = ft_compile(ft.train_step(loss_fn), fallback=False)
    data = [*DATA[:3], (DATA[3][0][:8], DATA[3][1][:8])]  # 32, 32, 32, then 8
    compiled, c_losses = run(core, fresh(), data, epochs=2)
    eager, e_losses = run(ft.train_step(loss_fn), fresh(), data, epochs=2)
    assert core.compiles == 2  # one graph per batch shape (dynamic=False), no more
    assert direct_calls(core) == 8 - 2  # each graph's first call goes through torch
    torch.testing.assert_close(c_losses, e_losses, rtol=1e-4, atol=1e-5)
    assert max_diff(compiled, eager) < 1e-4


class Tied(nn.Module):
    """Two layers sharing one weight (the state holds it once, under the first name)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(32, 16)
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.b.weight = self.a.weight
        self.out = nn.Linear(16, 10)

    def forward(self, x):
        return self.out(self.b(torch.tanh(self.a(torch.tanh(self.inp(x))))))


def test_tied_weights_train_as_one_tensor_as_in_the_eager_step():
    def state():
        torch.manual_seed(0)
        return ft.TrainState.create(Tied(), ft.optim.adam(1e-2), seed=0)

    assert "b.weight" not in state().params  # one tensor, one name
    core = ft_compile(ft.train_step(loss_fn), fallback=False)
    compiled, c_losses = run(core, state(), DATA[:20])
    eager, e_losses = run(ft.train_step(loss_fn), state(), DATA[:20])
    assert core.compiles == 1
    torch.testing.assert_close(c_losses, e_losses, rtol=1e-4, atol=1e-5)
    assert max_diff(compiled, eager) < 1e-4


def test_the_simd_probe_is_recorded_under_the_cache_dir_and_read_back(tmp_path, monkeypatch):
    from ftrain.compiling import options

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    assert options.cache_dir() == str(tmp_path)
    first = options._probe_once()  # probes here (x86-64 Linux), writes the record
    records = list((tmp_path / "ftrain").glob("vec_isa_*.json")) \
        if (tmp_path / "ftrain").exists() else []
    if not records:  # another platform: inductor probes itself, nothing recorded
        assert first is False
        return
    (record,) = records
    assert json.loads(record.read_text())["ok"] is first
    record.write_text(json.dumps({"ok": not first}))  # a later process reads, not probes
    assert options._probe_once() is (not first)
    record.write_text("not json")  # a damaged record: probe again, and rewrite it
    assert options._probe_once() is first
    assert json.loads(record.read_text())["ok"] is first
    keys = options.inductor_options(cpp_wrapper=True)
    assert keys["size_asserts"] is False and keys["cpp_cache_precompile_headers"] is False
    assert keys["cpp_wrapper"] is True and options.inductor_options()["cpp_wrapper"] is False
    assert keys.get("cpp.vec_isa_ok", False) is options.vec_isa_ok()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_reduce_overhead_on_cuda_matches_eager():  # pragma: no cover - GPU only
    device = torch.device("cuda")
    core = ft_compile(ft.train_step(loss_fn), mode="reduce-overhead", fallback=False)
    data = [(x.to(device), y.to(device)) for x, y in DATA]
    compiled, c_losses = run(core, fresh().to(device), data)
    eager, e_losses = run(ft.train_step(loss_fn), fresh().to(device), data)
    assert core.compiles == 1
    torch.testing.assert_close(c_losses, e_losses, rtol=1e-3, atol=1e-4)
    assert max_diff(compiled, eager) < 1e-3
