"""The optimiser pieces in one process, each against a float64 reference written here: the teacher
EMA, gradient clipping (both modes), LARS, parameter groups and the schedules' hyper-parameters."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import massl.optim
from massl.config import OptimConfig
from massl.optim import LARS, build_optimizer, clip_grads_, ema_update_, grad_norms, param_groups, set_hparams
from tests.engines_common import clip_error


def tensors(seed: int, shapes=((3, 4), (5,), (2, 2, 3)), scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g) * scale for s in shapes]


@pytest.mark.parametrize("momentum", [0.9, 0.996, 0.0, 1.0])
def test_ema_update_is_m_teacher_plus_one_minus_m_student(momentum):
    """0.9: m*t + (1-m)*s and (1-m)*t + m*s differ (at 0.5 they would not)."""
    teacher, student = tensors(0), tensors(1)
    expected = [momentum * t.double() + (1 - momentum) * s.double() for t, s in zip(teacher, student)]
    ema_update_(teacher, student, momentum)
    for got, want in zip(teacher, expected):
        assert torch.allclose(got.double(), want, rtol=0, atol=1e-6)
    assert all(torch.equal(s, s0) for s, s0 in zip(student, tensors(1)))  # the student is not touched


def test_ema_update_of_module_parameters():
    teacher, student = nn.Linear(4, 3), nn.Linear(4, 3)
    t0 = [p.detach().clone().double() for p in teacher.parameters()]
    ema_update_(teacher.parameters(), student.parameters(), 0.75)  # generators, as the engines pass them
    for p, t, s in zip(teacher.parameters(), t0, student.parameters()):
        assert torch.allclose(p.double(), 0.75 * t + 0.25 * s.double(), atol=1e-6)


@pytest.mark.parametrize("mode", ["per_param", "global"])
@pytest.mark.parametrize("seed,scale", [(0, 3.0), (1, 3.0), (2, 1e-3)])  # 1e-3: the 1e-6 guard matters
def test_clip_grads_against_float64_reference(mode, seed, scale):
    grads = tensors(seed, shapes=((3, 4), (5,), (2, 2, 3), (7,)), scale=scale)
    grads[1] *= 0.05  # a small gradient: per_param leaves it alone
    error = clip_error(mode, lambda: grads, lambda max_norm: clip_grads_(grads, max_norm, mode))
    assert error < 1e-6


@pytest.mark.parametrize("mode", ["per_param", "global"])
def test_clip_grads_below_the_threshold_or_off_leaves_gradients_alone(mode):
    grads = tensors(2)
    before = [g.clone() for g in grads]
    total = float(torch.stack([g.double().norm() for g in before]).norm())
    assert float(clip_grads_(grads, 0.0, mode)) == pytest.approx(total, rel=1e-6)  # max_norm 0: off
    assert float(clip_grads_(grads, 1e6, mode)) == pytest.approx(total, rel=1e-6)
    assert all(torch.equal(g, b) for g, b in zip(grads, before))


@pytest.mark.parametrize("mode", ["per_param", "global"])
@pytest.mark.parametrize("loss_scale", [1024.0, 2.0])
def test_clip_grads_with_a_loss_scale(mode, loss_scale):
    """Gradients that still carry a loss scale: norms and the threshold are taken without it, and
    the scaled gradients are clipped to max_norm * loss_scale."""
    plain = tensors(3, scale=2.0)
    scaled = [g * loss_scale for g in plain]
    t_plain = clip_grads_(plain, 1.0, mode)
    t_scaled = clip_grads_(scaled, 1.0, mode, grad_scale=loss_scale)
    assert float(t_scaled) == pytest.approx(float(t_plain), rel=1e-6)
    for a, b in zip(scaled, plain):
        assert torch.allclose(a / loss_scale, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["per_param", "global"])
def test_clip_grads_of_shards_sum_the_squares_over_the_group(mode, monkeypatch):
    """With a group, each gradient is a shard: here two ranks holding the same shard, so every
    norm is sqrt(2) times the local one (the all-reduce is replaced by its effect)."""
    group = object()
    monkeypatch.setattr(massl.optim, "all_reduce_", lambda t, g: t.mul_(2) if g is group else t)
    grads = tensors(8, scale=2.0)
    local = [g.double().norm() for g in grads]
    expected_total = float(torch.stack(local).norm()) * 2 ** 0.5
    ref = [g.double() * min(1.0, 1.0 / ((float(n) * 2 ** 0.5 if mode == "per_param" else expected_total) + 1e-6))
           for g, n in zip(grads, local)]
    assert float(clip_grads_(grads, 1.0, mode, group=group)) == pytest.approx(expected_total, rel=1e-6)
    for got, want in zip(grads, ref):
        assert torch.allclose(got.double(), want, rtol=1e-6, atol=1e-9)


def test_clip_grads_half_precision_and_empty():
    grads = [g.half() for g in tensors(4, scale=100.0)]  # norms beyond fp16's range when squared
    total = float(torch.stack([g.double().norm() for g in grads]).norm())
    assert float(clip_grads_(grads, 1.0, "global")) == pytest.approx(total, rel=1e-3)
    assert grads[0].dtype == torch.float16
    assert float(torch.stack([g.double().norm() for g in grads]).norm()) == pytest.approx(1.0, rel=1e-2)
    assert float(clip_grads_([], 1.0, "global")) == 0.0


def test_grad_norms_are_float32_l2_norms():
    grads = [g.half() for g in tensors(5, scale=300.0)]
    norms = grad_norms(grads)
    assert norms.dtype == torch.float32
    assert torch.allclose(norms.double(), torch.stack([g.double().norm() for g in grads]), rtol=1e-3)


def lars_reference(params, grads, steps, lr, wd, momentum, eta):
    """LARS in float64 with explicit loops: decay and trust ratio for parameters of 2+ dims only."""
    params = [p.double().clone() for p in params]
    mus = [torch.zeros_like(p) for p in params]
    for _ in range(steps):
        for p, g, mu in zip(params, grads, mus):
            d = g.double().clone()
            if p.ndim > 1:
                d = d + wd * p
                pn, dn = float(p.norm()), float(d.norm())
                d = d * (eta * pn / dn if pn > 0 and dn > 0 else 1.0)
            mu.mul_(momentum).add_(d)
            p.sub_(lr * mu)
    return params


def test_lars_against_float64_reference():
    params = [nn.Parameter(t) for t in tensors(6, shapes=((4, 3), (3,), (2, 5)))]
    params.append(nn.Parameter(torch.zeros(3, 2)))  # zero norm: trust ratio 1
    grads = tensors(7, shapes=((4, 3), (3,), (2, 5), (3, 2)))
    expected = lars_reference([p.detach() for p in params], grads, steps=3, lr=0.1, wd=0.05, momentum=0.8, eta=0.02)
    opt = LARS(params, lr=0.1, weight_decay=0.05, momentum=0.8, eta=0.02)
    for _ in range(3):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    for p, want in zip(params, expected):
        assert torch.allclose(p.detach().double(), want, atol=1e-6)


def test_lars_defaults():
    assert LARS([nn.Parameter(torch.zeros(1))]).defaults == dict(lr=0.0, weight_decay=0.0, momentum=0.9, eta=0.001)


def test_lars_skips_parameters_without_gradient():
    p, q = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2, 2)
    LARS([p, q], lr=1.0, eta=1.0, momentum=0.0).step()
    assert torch.equal(q.detach(), torch.ones(2)) and not torch.equal(p.detach(), torch.ones(2, 2))


def test_param_groups_decay_only_tensors_of_two_or_more_dims():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    model.register_parameter("pos", nn.Parameter(torch.zeros(1, 5, 3)))
    model.register_parameter("frozen", nn.Parameter(torch.zeros(3, 3), requires_grad=False))
    decay, no_decay = param_groups(model)
    assert decay["apply_wd"] and not no_decay["apply_wd"] and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model.pos)}
    assert {id(p) for p in no_decay["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}


@pytest.mark.parametrize("name,cls", [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD), ("lars", LARS)])
def test_build_optimizer_and_set_hparams(name, cls):
    model = nn.Linear(3, 2)
    opt = build_optimizer(OptimConfig(name=name, momentum=0.7, betas=[0.8, 0.95]), param_groups(model), fused=False)
    assert isinstance(opt, cls)
    assert all(g["lr"] == 0.0 and g["weight_decay"] == 0.0 for g in opt.param_groups)
    if name == "adamw":
        assert opt.param_groups[0]["betas"] == (0.8, 0.95)
    else:
        assert opt.param_groups[0]["momentum"] == 0.7
    set_hparams(opt, 0.01, 0.3)
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(0.01, 0.3), (0.01, 0.0)]


@pytest.mark.parametrize("fused", [True, False])
def test_build_optimizer_kernels(fused):
    """AdamW fused (no host sync per parameter) or foreach; SGD foreach."""
    model = nn.Linear(3, 2)
    adamw = build_optimizer(OptimConfig(name="adamw"), param_groups(model), fused=fused)
    assert bool(adamw.defaults.get("fused")) == fused and bool(adamw.defaults.get("foreach")) == (not fused)
    sgd = build_optimizer(OptimConfig(name="sgd"), param_groups(model), fused=fused)
    assert sgd.defaults["foreach"] is True
    assert build_optimizer(OptimConfig(name="adamw"), param_groups(model)).defaults["fused"]  # fused by default


def test_set_hparams_decays_a_group_without_the_flag():
    opt = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(2))]}], lr=0.0)
    set_hparams(opt, 0.1, 0.2)
    assert (opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"]) == (0.1, 0.2)
