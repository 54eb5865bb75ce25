"""The batched fast path of population steps (ftrain.populations.batched): it computes
what the vmap path computes (losses, per-member gradients, parameters after a few steps,
all compared with `torch.testing.assert_close`'s float32 defaults, rtol 1.3e-6 and atol
1e-5), and hands every step it has no rule for to vmap, whose results it then equals
bitwise."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils import _pytree as pytree

import ftrain as ft
from ftrain.populations.batched import Members, Unsupported
from ftrain.populations.population import population, population_step, vmap

QUIET = {"logger": False, "checkpoint": False, "progress": False}


def batches(n: int = 4, shape: tuple[int, ...] = (8, 6), classes: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g), torch.randint(0, classes, shape[:1], generator=g))
            for _ in range(n)]


def factory(make, optimizer):
    def build(seed: int) -> ft.TrainState:
        torch.manual_seed(seed)
        return ft.TrainState.create(make(), optimizer, seed=seed)
    return build


def ce(model, batch):
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}


def grads(step, pop, batch):
    """One step's per-member gradients and [N] metrics, by the path the step takes (random
    layers draw from the same seed)."""
    plan = step.plan(pop)
    trainable = {k: pop.params[k].clone().requires_grad_() for k in plan.trainable}
    frozen = {k: pop.params[k] for k in plan.frozen}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if step.batched:
            done = plan._batched(trainable, frozen, dict(pop.buffers), batch)
            assert done is not None, plan.vmap_reason
            gs, metrics = done
        else:
            loss, (metrics, _) = plan.forward_fn(trainable, frozen, dict(pop.buffers), batch)
            gs = torch.autograd.grad(loss.sum(), list(trainable.values()))
    return dict(zip(plan.trainable, gs)), metrics


def trained(step, pop, data):
    """The population after `data`, and every step's metrics."""
    seen = []
    out = ft.fit(ft.every(step, lambda s, m: seen.append(m), every_n_steps=1), pop.copy(), data,
                 epochs=1, **QUIET)
    return out, seen


def assert_same_path_results(loss_fn, pop, data, *, exact=False, **options):
    """The batched step and the vmap step agree on the first step's losses and gradients,
    on every step's metrics and on the state after `data` (bitwise with `exact`)."""
    fast = population_step(loss_fn, **options)
    slow = population_step(loss_fn, batched=False, **options)
    close = (lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0)) if exact else \
        torch.testing.assert_close
    if not exact:
        (ga, ma), (gb, mb) = grads(fast, pop, data[0]), grads(slow, pop, data[0])
        for k in gb:
            close(ga[k], gb[k])
        for k in mb:
            close(ma[k], mb[k])
    a, seen_a = trained(fast, pop, data)
    b, seen_b = trained(slow, pop, data)
    assert slow.vmap_reason == "batched=False"
    for x, y in zip(seen_a, seen_b, strict=True):
        assert list(x) == list(y)
        for k in y:
            close(x[k], y[k])
    for kind in ("params", "buffers", "opt_state"):
        for x, y in zip(pytree.tree_leaves(getattr(a, kind)), pytree.tree_leaves(getattr(b, kind)),
                        strict=True):
            close(x, y) if isinstance(x, torch.Tensor) else None
    return fast


# -- the fast path equals vmap -------------------------------------------------------------

def test_an_mlp_with_adam_takes_the_batched_path_and_equals_vmap():
    pop = population(ft.TrainState.create(
        nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)), ft.optim.adam(1e-2), seed=0),
        hparams={"lr": [1e-2, 3e-2, 1e-3]})
    step = assert_same_path_results(ce, pop, batches(6))
    assert step.vmap_reason is None


class Sink(nn.Module):
    """Many layers and tensor functions: each has a batched rule."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.LayerNorm(16), nn.GELU())
        self.mix = nn.Parameter(torch.randn(4, 4) * 0.3)
        self.acts = nn.ModuleList([nn.SiLU(), nn.Tanh(), nn.LeakyReLU(0.1), nn.Sigmoid()])
        self.head = nn.Linear(16, 3)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        b = h.shape[0]
        parts = torch.matmul(h.view(b, 4, 4), self.mix).transpose(1, 2).permute(0, 2, 1)
        parts = [act(p) for act, p in zip(self.acts, parts.contiguous().unbind(1))]
        h2 = torch.stack(parts, dim=1).reshape(b, -1)
        a, c = h2.chunk(2, dim=-1)
        h3 = torch.cat([a * c.sigmoid(), F.softmax(c, -1)], dim=1) + h[:, :16] * self.scale
        h3 = F.relu(torch.where(h3 > 0, h3, 0.1 * h3).clamp(-5, 5) - 0.01, inplace=True)
        return self.head(h3[..., :]) + h3.pow(2).mean(-1, keepdim=True).sqrt()


def sink_loss(model, batch):
    x, y, t = batch
    out = model(x)
    loss = (F.cross_entropy(out, y, label_smoothing=0.1, ignore_index=2)
            + F.nll_loss(F.log_softmax(out, dim=1), y, reduction="sum") / len(y)
            + 0.1 * F.mse_loss(out.sum(1), t) + F.smooth_l1_loss(out[:, 0], t, beta=0.5)
            + F.huber_loss(out[:, 1], t) + F.l1_loss(out.amax(1), t)
            + F.binary_cross_entropy_with_logits(out[:, 2], (t > 0).float())
            + 1e-4 * sum(p.pow(2).sum() for p in model.parameters())
            + 0.01 * torch.logsumexp(out, dim=1).mean())
    return loss, {"acc": (out.argmax(-1) == y).float().mean(), "const": 1.0,
                  "top": out.max(dim=1).values.mean()}


def test_many_layers_losses_and_tensor_functions_equal_vmap():
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 3, 4, generator=g), torch.randint(0, 3, (8,), generator=g),
             torch.randn(8, generator=g)) for _ in range(3)]
    pop = population(factory(Sink, ft.optim.adamw(1e-2)), n=3)
    step = assert_same_path_results(sink_loss, pop, data)
    assert step.vmap_reason is None


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 11, d: int = 8, heads: int = 2, seq: int = 6) -> None:
        super().__init__()
        self.heads = heads
        self.tok = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Embedding(seq, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.RMSNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"),
                                 nn.Dropout(0.1), nn.Linear(4 * d, d))
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        b, t = idx.shape
        x = self.tok(idx) + self.pos(torch.arange(t))
        d = x.shape[-1]
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return self.head(x + self.mlp(self.ln2(x)))


def lm_loss(model, batch):
    idx, target = batch
    logits = model(idx)
    flat = F.cross_entropy(logits.view(-1, logits.size(-1)), target.view(-1))
    return flat + F.cross_entropy(logits.transpose(1, 2), target)  # classes in dim 1 too


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch: vmapped attention
def test_a_tiny_transformer_equals_vmap_with_sgd():
    """SGD: Adam turns the rounding noise of a gradient that is ~0 (attention, a padding
    row) into full-size steps, in two separate runs as well."""
    g = torch.Generator().manual_seed(2)
    data = [(torch.randint(0, 11, (4, 6), generator=g), torch.randint(0, 11, (4, 6), generator=g))
            for _ in range(3)]
    pop = population(factory(TinyLM, ft.optim.sgd(0.1, momentum=0.9)), n=3)
    step = assert_same_path_results(lm_loss, pop, data)
    assert step.vmap_reason is None
    padding_row = grads(step, pop, data[0])[0]["tok.weight"][:, 0]
    assert torch.equal(padding_row, torch.zeros_like(padding_row))


@pytest.mark.parametrize("loss", [
    lambda out, y: F.cross_entropy(out, y, reduction="sum"),
    lambda out, y: F.cross_entropy(out, y, reduction="none").mean(),
    lambda out, y: F.cross_entropy(out, torch.where(y == 1, -100, y)),   # ignored targets
    lambda out, y: F.cross_entropy(out[0], y[0]),                        # one sample
    lambda out, y: F.nll_loss(out.log_softmax(-1), y, ignore_index=0),
    lambda out, y: F.mse_loss(out, F.one_hot(y, 3).float()),
    lambda out, y: F.binary_cross_entropy(out.sigmoid(), F.one_hot(y, 3).float()),
    lambda out, y: F.binary_cross_entropy_with_logits(out, F.one_hot(y, 3).float(),
                                                      pos_weight=torch.tensor([1.0, 2.0, 3.0])),
    lambda out, y: (out.gather(1, y[:, None]).squeeze(1) - out.logsumexp(1)).neg().mean(),
    lambda out, y: -out.log_softmax(1)[torch.arange(len(y)), y].mean(),
], ids=["ce-sum", "ce-none", "ce-ignored", "ce-1d", "nll", "mse", "bce", "bce-logits",
        "gather", "index"])
def test_losses_equal_vmap(loss):
    pop = population(ft.TrainState.create(
        nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)), ft.optim.sgd(0.5), seed=0),
        n=3)
    step = assert_same_path_results(lambda m, b: loss(m(b[0]), b[1]), pop, batches(3))
    assert step.vmap_reason is None


def test_per_member_batches_take_the_batched_path():
    data = batches(3, shape=(3, 8, 6))                   # member dim 3 first
    data = [(x, torch.randint(0, 3, (3, 8))) for x, _ in data]
    pop = population(ft.TrainState.create(
        nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)), ft.optim.adam(1e-2), seed=0),
        n=3)
    step = assert_same_path_results(ce, pop, data, per_member_batches=True)
    assert step.vmap_reason is None


# -- randomness ------------------------------------------------------------------------------

def dropout_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3))


@pytest.mark.parametrize("randomness", ["different", "same"])
def test_dropout_draws_what_vmap_draws(randomness):
    same_start = population([factory(dropout_mlp, ft.optim.sgd(0.2))(0)] * 3)
    step = assert_same_path_results(ce, same_start, batches(4), randomness=randomness)
    assert step.vmap_reason is None
    w = trained(step, same_start, batches(4))[0].params["0.weight"]
    assert torch.equal(w[0], w[1]) == (randomness == "same")  # members' masks differ or not


@torch.library.custom_op("ftrain_test::jitter", mutates_args=())
def jitter(x: torch.Tensor) -> torch.Tensor:
    """A draw the guard cannot see by name: inside an opaque operator."""
    return x + 0.1 * torch.randn_like(x)


def test_random_functions_on_plain_tensors_take_vmap_unless_draws_are_the_same():
    def noisy(model, batch):
        x, y = batch
        return ce(model, (x + 0.1 * torch.randn_like(x), y))  # x is every member's

    def hidden(model, batch):
        x, y = batch
        return ce(model, (jitter(x), y))

    pop = population(factory(dropout_mlp, ft.optim.sgd(0.2)), n=3)
    for fn, why in ((noisy, "randn_like on plain tensors"),
                    (hidden, "drawn outside the batched rules")):
        step = assert_same_path_results(fn, pop, batches(3), exact=True)
        assert why in step.vmap_reason
    # with the same randomness every member draws the same numbers, as a plain call does
    step = assert_same_path_results(noisy, pop, batches(3), randomness="same")
    assert step.vmap_reason is None


# -- the fallback ------------------------------------------------------------------------------

class Conv(nn.Module):
    """Dropout draws, then a convolution (no batched rule) hands the step to vmap."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 12)
        self.drop = nn.Dropout(0.3)
        self.conv = nn.Conv1d(3, 2, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(F.relu(self.fc(x))).view(-1, 3, 4)
        return self.head(self.conv(h).flatten(1))


def test_an_unknown_layer_runs_through_vmap_with_the_same_numbers():
    pop = population(factory(Conv, ft.optim.adam(1e-2)), n=3)
    step = assert_same_path_results(ce, pop, batches(4), exact=True)
    assert "conv1d" in step.vmap_reason
    assert step.plan(pop).batched is None  # for good: no second try per step


def test_what_might_differ_takes_vmap():
    def mixed_dtypes(model, batch):  # float32 loss * float64 0-d: promotion sees 0-d-ness
        loss, metrics = ce(model, batch)
        return (loss * torch.tensor(2.0, dtype=torch.float64)).float(), metrics

    def sorted_logits(model, batch):  # no rule for sort
        return F.cross_entropy(model(batch[0]).sort(dim=-1).values, batch[1])

    pop = population(ft.TrainState.create(
        nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)), ft.optim.sgd(0.1), seed=0),
        n=2)
    for fn, why in ((mixed_dtypes, "mixed dtypes"), (sorted_logits, "no batched rule for sort")):
        step = assert_same_path_results(fn, pop, batches(2), exact=True)
        assert why in step.vmap_reason


def test_errors_are_the_vmap_paths():
    def branches_on_values(model, batch):
        loss = F.cross_entropy(model(batch[0]), batch[1])
        return loss * 2 if loss > 1 else loss

    def in_place_on_a_parameter(model, batch):
        model.weight.mul_(1.0)
        return F.cross_entropy(model(batch[0]), batch[1])

    pop = population(ft.TrainState.create(nn.Linear(6, 3), ft.optim.sgd(0.1), seed=0), n=2)
    batch = batches(1)[0]
    for fn in (lambda m, b: m(b[0]), lambda m, b: m(b[0].t()).sum(), branches_on_values,
               in_place_on_a_parameter):
        errors = []
        for batched in (True, False):
            with pytest.raises(Exception) as info:
                population_step(fn, batched=batched)(pop, batch)
            errors.append((type(info.value), str(info.value)))
        assert errors[0] == errors[1]


def test_batched_can_be_turned_off():
    step = vmap(ft.train_step(ce), batched=False)
    assert step.batched is False and step.compiled().batched is False
    pop = population(ft.TrainState.create(nn.Linear(6, 3), ft.optim.sgd(0.1), seed=0), n=2)
    step(pop, batches(1)[0])
    assert step.vmap_reason == "batched=False"


# -- the Members tensor ------------------------------------------------------------------------

def test_a_members_tensor_shows_one_member_and_refuses_what_it_cannot_do():
    m = Members(torch.arange(24.0).view(2, 3, 4))
    assert isinstance(m, torch.Tensor) and m.shape == (3, 4) and m.dim() == 2 and len(m) == 3
    assert m.size(-1) == 4 and m.numel() == 12 and m.dtype == torch.float32
    total = m.sum(dim=1)
    assert isinstance(total, Members) and total.shape == (3,)
    torch.testing.assert_close(total.stacked, torch.arange(24.0).view(2, 3, 4).sum(2))
    assert m[:, 1:].shape == (3, 3) and m.T.shape == (4, 3)
    with pytest.raises(Unsupported, match="no batched rule for sort"):
        m.sort()
    with pytest.raises(Unsupported, match="reached the dispatcher"), \
            torch._C.DisableTorchFunctionSubclass():
        torch.add(m, m)
    with pytest.raises(Unsupported):
        bool(m.sum() > 0)  # a value read: each member has its own


def test_autocast_takes_vmap():
    def mixed_precision(model, batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ce(model, batch)

    pop = population(ft.TrainState.create(
        nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)), ft.optim.sgd(0.1), seed=0),
        n=2)
    step = assert_same_path_results(mixed_precision, pop, batches(2), exact=True)
    assert "autocast" in step.vmap_reason
