"""Flow matching conventions: shift, time distributions, loss, sampling grid, Euler/Heun, CFG and AutoGuidance."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from trainer.flow import (
    euler_sample,
    flow_matching_loss,
    guided_velocity_fn,
    heun_sample,
    interpolate,
    reference_grid,
    sample_train_times,
    shift_alpha,
    shift_timesteps,
    velocity_target,
)

ALPHA_256 = math.sqrt(48)


# ----------------------------------------------------------------------------- shift


def test_shift_alpha_for_rae_latents():
    assert shift_alpha((768, 16, 16)) == pytest.approx(math.sqrt(48))  # ~6.93
    assert shift_alpha((768, 32, 32)) == pytest.approx(math.sqrt(192))
    assert shift_alpha((4, 32, 32)) == pytest.approx(1.0)  # SD-VAE-sized latent: no shift
    assert shift_alpha((768, 16, 16), base_dim=196608) == pytest.approx(1.0)


def test_shift_timesteps_formula():
    a = ALPHA_256
    for t in (0.0, 0.1, 0.5, 0.9, 1.0):
        assert shift_timesteps(t, a) == pytest.approx(a * t / (1 + (a - 1) * t))
    t = torch.linspace(0, 1, 11)
    shifted = shift_timesteps(t, a)
    assert shifted[0] == 0 and shifted[-1] == 1
    assert bool((shifted[1:-1] > t[1:-1]).all())  # alpha > 1 moves times toward noise
    assert torch.equal(shift_timesteps(t, 1.0), t)


# ----------------------------------------------------------------------------- training


def test_interpolation_and_target():
    x, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    assert torch.allclose(interpolate(x, eps, torch.zeros(3)), x)  # t = 0 is data
    assert torch.allclose(interpolate(x, eps, torch.ones(3)), eps)  # t = 1 is noise
    t = torch.tensor([0.2, 0.5, 0.9])
    h = 1e-3
    fd = (interpolate(x, eps, t + h) - interpolate(x, eps, t - h)) / (2 * h)
    torch.testing.assert_close(fd, velocity_target(x, eps), rtol=1e-3, atol=1e-3)
    assert torch.allclose(interpolate(x, eps, t)[1], 0.5 * x[1] + 0.5 * eps[1])


def test_logit_normal_statistics():
    g = torch.Generator().manual_seed(0)
    t = sample_train_times(200_000, alpha=1.0, generator=g)
    z = torch.logit(t.double())
    assert t.dtype == torch.float32 and t.shape == (200_000,)
    assert abs(z.mean().item()) < 0.01
    assert abs(z.std().item() - 1.0) < 0.01
    assert t.max() <= torch.tensor(0.999) and t.min() >= 0.0

    z = torch.logit(sample_train_times(200_000, alpha=1.0, loc=-0.5, scale=0.5,
                                       generator=torch.Generator().manual_seed(1)).double())
    assert abs(z.mean().item() + 0.5) < 0.01 and abs(z.std().item() - 0.5) < 0.01

    # The shift is applied after the draw: same generator state -> shift of the unshifted times.
    unshifted = sample_train_times(1000, alpha=1.0, generator=torch.Generator().manual_seed(3))
    shifted = sample_train_times(1000, alpha=ALPHA_256, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(shifted, shift_timesteps(unshifted, ALPHA_256))
    assert shifted.median() > 0.8  # sqrt(48) pushes the median from 0.5 to ~0.87


def test_uniform_times_are_clipped_and_reproducible():
    a = sample_train_times(100_000, dist="uniform", alpha=1.0, generator=torch.Generator().manual_seed(0))
    b = sample_train_times(100_000, dist="uniform", alpha=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert abs(a.mean().item() - 0.5) < 0.01 and a.max() <= torch.tensor(0.999)
    with pytest.raises(ValueError, match="unknown time distribution"):
        sample_train_times(4, dist="beta", alpha=1.0)


def test_flow_matching_loss_matches_a_hand_computation():
    seen = {}

    def model(x_t, t, y):
        seen.update(x_t=x_t, t=t, y=y)
        return 0.5 * x_t

    x, y = torch.randn(4, 3, 2, 2), torch.tensor([1, 2, 3, 4])
    loss, extras = flow_matching_loss(model, x, y, alpha=ALPHA_256, generator=torch.Generator().manual_seed(7))

    g = torch.Generator().manual_seed(7)  # same draws in the documented order: times, then noise
    t = sample_train_times(4, alpha=ALPHA_256, generator=g)
    eps = torch.randn(x.shape, generator=g)
    x_t = (1 - t[:, None, None, None]) * x + t[:, None, None, None] * eps
    expected = ((0.5 * x_t - (eps - x)) ** 2).mean()
    torch.testing.assert_close(seen["t"], t)
    torch.testing.assert_close(seen["x_t"], x_t)
    assert torch.equal(seen["y"], y)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(extras["loss_per_sample"].mean(), expected)
    assert extras["t"].shape == (4,)


# ----------------------------------------------------------------------------- sampling


def test_reference_grid():
    grid = reference_grid(50, alpha=ALPHA_256)
    assert grid.shape == (50,) and grid.dtype == torch.float32
    assert grid[0].item() == 1.0
    end = ALPHA_256 * 0.001 / (1 + (ALPHA_256 - 1) * 0.001)
    assert grid[-1].item() == pytest.approx(end, rel=1e-4)
    assert grid[-1].item() == pytest.approx(0.0069, abs=1e-4)
    assert bool((grid[1:] < grid[:-1]).all())
    u = 1 - torch.arange(50, dtype=torch.float64) * (0.999 / 49)
    torch.testing.assert_close(grid.double(), ALPHA_256 * u / (1 + (ALPHA_256 - 1) * u), rtol=0, atol=1e-6)
    assert len(reference_grid(8, alpha=1.0)) == 8


def test_euler_follows_a_straight_path_exactly_and_stops_at_the_last_grid_point():
    # The ideal velocity for one data point x0 is (x - x0) / t: Euler is exact on straight paths.
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    grid = reference_grid(50, alpha=ALPHA_256)
    times = []

    def velocity(x, t):
        times.append(t.clone())
        return (x - x0) / t[:, None, None, None]

    out = euler_sample(velocity, noise, grid)
    assert len(times) == 49  # 49 steps, one call each
    torch.testing.assert_close(torch.stack([t[0] for t in times]), grid[:-1])
    assert all(t.shape == (2,) for t in times)
    torch.testing.assert_close(out, interpolate(x0, noise, grid[-1]), rtol=1e-4, atol=1e-4)  # no final jump


def test_euler_on_a_linear_ode_matches_its_recurrence_and_solution():
    lam = -1.3
    noise = torch.ones(1, 1)
    grid = torch.linspace(1.0, 0.0, 201)
    out = euler_sample(lambda x, t: lam * x, noise, grid)
    steps = grid[1:] - grid[:-1]
    torch.testing.assert_close(out, noise * torch.prod(1 + lam * steps))
    assert out.item() == pytest.approx(math.exp(-lam), rel=1e-2)  # x(0) = x(1) e^{-lam}


def test_heun_is_more_accurate_than_euler():
    # dx/dt = x cos(t): x(t_end) = x(1) exp(sin(t_end) - sin(1)).
    def velocity(x, t):
        return x * torch.cos(t)[:, None]

    noise = torch.tensor([[1.0], [2.0]], dtype=torch.float64)

    def errors(steps):
        grid = reference_grid(steps, alpha=2.0).double()
        exact = noise * math.exp(math.sin(grid[-1].item()) - math.sin(1.0))
        return [(sampler(velocity, noise, grid) - exact).abs().max().item() for sampler in (euler_sample, heun_sample)]

    (euler_10, heun_10), (euler_20, heun_20) = errors(11), errors(21)
    assert heun_10 < euler_10 / 5
    assert heun_20 / heun_10 < 0.3  # second order: halving the steps quarters the error
    assert euler_20 / euler_10 > 0.4  # first order: it only halves


def test_heun_call_count_and_euler_last_step_at_zero():
    calls = []

    def velocity(x, t):
        calls.append(float(t[0]))
        return -x

    heun_sample(velocity, torch.ones(1, 1), reference_grid(6, alpha=1.0))
    assert len(calls) == 10  # every step is Heun on a grid ending above 0
    calls.clear()
    heun_sample(velocity, torch.ones(1, 1), torch.linspace(1.0, 0.0, 6))
    assert len(calls) == 9 and 0.0 not in calls  # the step onto t = 0 is Euler


# ----------------------------------------------------------------------------- guidance


class ToyModel(nn.Module):
    """v = w_y * x + t: a label-dependent toy velocity that records each forward's batch."""

    def __init__(self, offset: float = 0.0):
        super().__init__()
        self.register_buffer("w", torch.linspace(0.5, 2.0, 1001) + offset)
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t, y):
        self.batches.append((t.clone(), y.clone()))
        return self.w[y][:, None, None, None] * x + t[:, None, None, None]


def test_cfg_matches_a_hand_computation_with_an_inclusive_interval():
    model = ToyModel().eval()
    x = torch.randn(5, 2, 3, 3)
    y = torch.tensor([3, 17, 999, 0, 500])
    # Ends of the interval exactly, inside, and just outside on both sides.
    t = torch.tensor([0.2, 0.6, 0.5, 0.19999, 0.60001])
    v = guided_velocity_fn(model, y, cfg_scale=4.0, cfg_interval=(0.2, 0.6))(x, t)

    cond = model.w[y][:, None, None, None] * x + t[:, None, None, None]
    uncond = model.w[1000] * x + t[:, None, None, None]
    guided = uncond + 4.0 * (cond - uncond)
    torch.testing.assert_close(v[:3], guided[:3])
    torch.testing.assert_close(v[3:], cond[3:])

    assert len(model.batches) == 1  # ONE forward: [cond (5); uncond for the 3 inside]
    tb, yb = model.batches[0]
    assert torch.equal(yb, torch.tensor([3, 17, 999, 0, 500, 1000, 1000, 1000]))
    assert torch.equal(tb[5:], t[:3])


def test_cfg_doubles_the_batch_inside_and_skips_the_uncond_half_outside():
    model = ToyModel().eval()
    x, y = torch.randn(4, 2, 3, 3), torch.tensor([1, 2, 3, 4])
    fn = guided_velocity_fn(model, y, cfg_scale=2.0, cfg_interval=(0.0, 0.7))
    fn(x, torch.full((4,), 0.5))
    assert model.batches[-1][1].tolist() == [1, 2, 3, 4, 1000, 1000, 1000, 1000]
    v = fn(x, torch.full((4,), 0.9))
    assert model.batches[-1][1].tolist() == [1, 2, 3, 4]  # nothing inside: conditional only
    torch.testing.assert_close(v, model.w[y][:, None, None, None] * x + 0.9)

    guided_velocity_fn(model, y, cfg_scale=1.0)(x, torch.full((4,), 0.5))
    assert len(model.batches[-1][1]) == 4  # scale 1 is the conditional model


def test_autoguidance_formula_and_interval():
    main, weak = ToyModel().eval(), ToyModel(offset=0.3).eval()
    x, y = torch.randn(3, 2, 3, 3), torch.tensor([5, 6, 7])
    t = torch.tensor([0.1, 0.5, 0.95])
    v = guided_velocity_fn(main, y, weak_model=weak, ag_scale=1.42, cfg_interval=(0.0, 0.9))(x, t)
    m = main.w[y][:, None, None, None] * x + t[:, None, None, None]
    w = weak.w[y][:, None, None, None] * x + t[:, None, None, None]
    expected = torch.cat([(w + 1.42 * (m - w))[:2], m[2:]])
    torch.testing.assert_close(v, expected)
    assert weak.batches[-1][1].tolist() == [5, 6]  # same conditional labels, only the samples inside

    weak.batches.clear()
    v1 = guided_velocity_fn(main, y, weak_model=weak, ag_scale=1.0)(x, t)
    torch.testing.assert_close(v1, m)
    assert weak.batches == []  # scale 1: main model only


def test_guidance_rejects_misuse():
    model, weak = ToyModel().eval(), ToyModel().eval()
    y = torch.tensor([1])
    with pytest.raises(ValueError, match="train mode"):
        guided_velocity_fn(ToyModel().train(), y, cfg_scale=2.0)
    with pytest.raises(ValueError, match="ag_scale"):
        guided_velocity_fn(model, y, weak_model=weak)
    with pytest.raises(ValueError, match="not both"):
        guided_velocity_fn(model, y, cfg_scale=2.0, weak_model=weak, ag_scale=1.5)


def test_sampling_a_tiny_dit_end_to_end():
    from trainer.models.dit import DiTConfig, build_model

    cfg = DiTConfig(in_channels=4, input_size=4, hidden_size=32, depth=1, num_heads=2,
                    head_hidden_size=32, head_depth=1, head_num_heads=2, num_classes=10)
    model = build_model(cfg).eval()
    y = torch.tensor([1, 2])
    fn = guided_velocity_fn(model, y, cfg_scale=1.5, cfg_interval=(0.1, 1.0), null_label=10)
    noise = torch.randn(2, 4, 4, 4)
    out = euler_sample(fn, noise, reference_grid(5, alpha=shift_alpha((4, 4, 4))))
    assert torch.equal(out, noise)  # zero-init model: velocity 0, the sample stays at the noise
