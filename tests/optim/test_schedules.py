"""Eq. 15 against values worked out by hand from Table 3, the other schedules, and ScheduleLR."""

from __future__ import annotations

import math

import pytest
import torch

from gmix_curvature.optim import (
    ScheduleLR,
    build_schedule,
    inverse_sqrt_lr,
    linear_scaled_lr,
    polynomial_lr,
    scaled_warmup_steps,
    schedule_from_config,
)

NESTEROV = dict(total_steps=2512, warmup_steps=706, lr_peak=7.05, lr_final=6e-6, p_warmup=2.0, p_decay=2.0)
LARS = dict(total_steps=2512, warmup_steps=706, lr_peak=29.0, lr_final=1e-4, p_warmup=1.0, p_decay=2.0)

# (table, step, value by hand): warmup (t/706)^p·η_peak; decay η_f + (η_p − η_f)·((2512 − t)/1806)²
HAND = [
    ("nesterov", 0, 0.0),
    ("nesterov", 353, 7.05 * 0.25),
    ("nesterov", 706, 7.05),
    ("nesterov", 707, 6e-6 + (7.05 - 6e-6) * (1805 / 1806) ** 2),
    ("nesterov", 1609, 6e-6 + (7.05 - 6e-6) * 0.25),
    ("nesterov", 2512, 6e-6),
    ("lars", 0, 0.0),
    ("lars", 353, 14.5),
    ("lars", 706, 29.0),
    ("lars", 1609, 1e-4 + (29.0 - 1e-4) * 0.25),
    ("lars", 2061, 1e-4 + (29.0 - 1e-4) * (451 / 1806) ** 2),
    ("lars", 2512, 1e-4),
    ("lars", 3000, 1e-4),  # after T: stays at η_final
]


@pytest.mark.parametrize("table, step, want", HAND, ids=[f"{t}-{s}" for t, s, _ in HAND])
def test_eq15_table3_hand_values(table, step, want):
    kw = NESTEROV if table == "nesterov" else LARS
    assert polynomial_lr(step, **kw) == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_eq15_is_continuous_at_the_peak_and_monotone():
    lrs = [polynomial_lr(t, **NESTEROV) for t in range(2513)]
    assert all(a <= b for a, b in zip(lrs[:706], lrs[1:707]))
    assert all(a >= b for a, b in zip(lrs[706:-1], lrs[707:]))
    assert abs(lrs[707] - lrs[706]) < 0.02  # no jump across t_warmup


def test_eq15_lr_init():
    assert polynomial_lr(0, total_steps=10, warmup_steps=4, lr_init=0.5, lr_peak=1.0) == 0.5
    assert polynomial_lr(2, total_steps=10, warmup_steps=4, lr_init=0.5, lr_peak=1.0) == 0.75


def test_inverse_sqrt_and_scaled_warmup():
    assert inverse_sqrt_lr(0, warmup_steps=4000, lr_peak=1e-3) == 0.0
    assert inverse_sqrt_lr(1000, warmup_steps=4000, lr_peak=1e-3) == pytest.approx(2.5e-4)
    assert inverse_sqrt_lr(9000, warmup_steps=4000, lr_peak=1e-3) == pytest.approx(1e-3 * 2 / 3)
    # Vaswani et al.: d^-0.5·min(t^-0.5, t·w^-1.5) equals the peak form with η_peak = (d·w)^-0.5
    d, w = 512, 4000
    for t in (1, 100, 4000, 10_000):
        vaswani = d**-0.5 * min(t**-0.5, t * w**-1.5)
        assert inverse_sqrt_lr(t, warmup_steps=w, lr_peak=(d * w) ** -0.5) == pytest.approx(vaswani, rel=1e-12)
    # "4000 for the base batch size 64 and linearly decayed by the batch size": constant warmup samples
    assert [scaled_warmup_steps(b) for b in (64, 128, 512, 2048, 5120)] == [4000, 2000, 500, 125, 50]
    assert linear_scaled_lr(1e-3, 5000) == pytest.approx(0.025)


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("poly", dict(total_steps=10, warmup_steps=11, lr_peak=1.0), "warmup_steps=11 exceeds total_steps=10"),
        ("poly", dict(total_steps=0, warmup_steps=0, lr_peak=1.0), "total_steps must be >= 1"),
        ("cosine", dict(total_steps=10, warmup_steps=-1, lr_peak=1.0), "warmup_steps must be >= 0"),
        ("poly", dict(total_steps=10, warmup_steps=2, lr_peak=1.0, p_decay=-1.0), "p_warmup and p_decay"),
        ("exp", dict(), "unknown schedule 'exp'; valid: constant, cosine, poly, rsqrt"),
    ],
)
def test_bad_schedules(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_schedule(name, **kwargs)


def test_negative_step():
    with pytest.raises(ValueError, match="step must be >= 0"):
        polynomial_lr(-1, **NESTEROV)


def test_schedule_lr_counts_optimizer_steps_and_saves_numbers_only(tmp_path):
    fn = build_schedule("poly", **LARS)
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [w]}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 14.5}], lr=29.0)
    sched = ScheduleLR(opt, fn)
    seen = []
    for _ in range(5):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert [s[0] for s in seen] == pytest.approx([fn(t) for t in range(5)], rel=1e-12)
    assert [s[1] for s in seen] == pytest.approx([fn(t) / 2 for t in range(5)], rel=1e-12)
    torch.save(sched.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    assert "schedule" not in state and "scales" not in state
    opt2 = torch.optim.SGD([{"params": [w]}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 14.5}], lr=29.0)
    sched2 = ScheduleLR(opt2, fn)
    sched2.load_state_dict(state)
    sched2.step()
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([fn(6), fn(6) / 2], rel=1e-12)


def test_schedule_from_config_linear_scaling():
    from types import SimpleNamespace

    cfg = SimpleNamespace(
        schedule="poly", warmup_steps=20, lr=0.1, lr_scaling="linear", batch_size=5000, base_batch=200,
        lr_init=0.0, lr_final=0.0, p_warmup=1.0, p_decay=2.0,
    )
    fn = schedule_from_config(cfg, 100)
    assert fn(20) == pytest.approx(2.5)
    assert fn(10) == pytest.approx(1.25)
    assert math.isclose(fn(100), 0.0, abs_tol=1e-15)
