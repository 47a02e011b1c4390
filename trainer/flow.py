"""Flow matching for RAE latents: one place for each convention (interpolation, time shift, samplers, guidance).

Conventions (docs/method.md "Flow matching"; docs/checkpoint-format.md section 6):
- Path: x_t = (1 - t) x + t eps, with t = 0 data and t = 1 noise. The model predicts v = eps - x.
- Time shift for high-dimensional latents: t' = a t / (1 + (a - 1) t), a = sqrt(m / n), m = C*H*W of
  the latent, n = 4096 (768x16x16 -> a = sqrt(48) ~ 6.93).
- Sampling: an ODE from t = 1 (noise) down the shifted grid `1 - linspace(0, 0.999, 50)`, 49 Euler
  steps ending at shift(0.001) ~ 0.0069 at 256px; the last state is returned as is (no final jump).
- Guidance inside a time interval [t_min, t_max], both ends inclusive; outside it the conditional
  (CFG) or main (AutoGuidance) prediction is used unchanged.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (B, ...), t (B,)) -> v like x

TRAIN_T_MAX = 0.999  # training times are clipped to [0, TRAIN_T_MAX] before the shift


# ----------------------------------------------------------------------------- time shift


def shift_alpha(latent_shape: tuple[int, int, int], base_dim: int = 4096) -> float:
    """a = sqrt(m / base_dim) with m = C*H*W of one latent (768x16x16 -> sqrt(48))."""
    channels, height, width = latent_shape
    return math.sqrt(channels * height * width / base_dim)


def shift_timesteps(t, alpha: float):
    """t' = a t / (1 + (a - 1) t): moves times toward noise for a > 1; fixes 0 and 1. Float or tensor."""
    return alpha * t / (1 + (alpha - 1) * t)


# ----------------------------------------------------------------------------- training


def sample_train_times(
    n: int,
    *,
    dist: str = "logit_normal",
    alpha: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    loc: float = 0.0,
    scale: float = 1.0,
) -> torch.Tensor:
    """n training times, float32 [n] on `device`: draw, clip to [0, 0.999], then shift by alpha.

    dist "logit_normal": sigmoid(N(loc, scale^2)) (the paper's and the released training configs');
    "uniform": U(0, 1) (an early version of those configs). Draws happen on the generator's device when one is given (so a CPU generator reproduces
    the same times on any device), then move to `device`.
    """
    draw_device = generator.device if generator is not None else device
    if dist == "logit_normal":
        z = torch.randn(n, generator=generator, device=draw_device)
        t = torch.sigmoid(loc + scale * z)
    elif dist == "uniform":
        t = torch.rand(n, generator=generator, device=draw_device)
    else:
        raise ValueError(f"unknown time distribution {dist!r}; use 'logit_normal' or 'uniform'")
    t = t.clamp(0.0, TRAIN_T_MAX)
    return shift_timesteps(t, alpha).to(device=device if device is not None else t.device, dtype=torch.float32)


def _expand_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t of shape (B,) (or a scalar) -> broadcastable against x (B, ...)."""
    t = torch.as_tensor(t, device=x.device, dtype=x.dtype)
    return t.reshape(-1, *([1] * (x.dim() - 1))) if t.dim() == 1 else t


def interpolate(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x + t eps; x and eps (B, ...), t (B,) or a scalar."""
    t = _expand_like(t, x)
    return (1 - t) * x + t * eps


def velocity_target(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """d x_t / d t = eps - x: what the model learns to predict."""
    return eps - x


def flow_matching_loss(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor | None,
    *,
    alpha: float,
    dist: str = "logit_normal",
    generator: torch.Generator | None = None,
    loc: float = 0.0,
    scale: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Plain MSE between model(x_t, t, y) and eps - x, for clean normalized latents x (B, C, H, W).

    Returns (loss scalar fp32, extras): extras["t"] (B,) the shifted times, extras["loss_per_sample"]
    (B,) detached per-sample MSE (for loss-vs-t logging). The noise and the times both come from
    `generator` when given (drawn on its device), so a step is reproducible.
    """
    t = sample_train_times(
        x.shape[0], dist=dist, alpha=alpha, generator=generator, device=x.device, loc=loc, scale=scale
    )
    draw_device = generator.device if generator is not None else x.device
    eps = torch.randn(x.shape, generator=generator, device=draw_device).to(x.device, x.dtype)
    v = model(interpolate(x, eps, t), t, y)
    err = (v.float() - velocity_target(x, eps).float()).pow(2)
    per_sample = err.flatten(1).mean(1)
    return per_sample.mean(), {"t": t, "loss_per_sample": per_sample.detach()}


# ----------------------------------------------------------------------------- sampling


def reference_grid(steps: int = 50, *, alpha: float, t_end: float = 0.999) -> torch.Tensor:
    """shift(1 - linspace(0, t_end, steps)), float32 [steps], decreasing from 1.0 to shift(1 - t_end).

    Computed in float32 with the reference's operations, so the grid matches it bitwise.
    """
    if steps < 2:
        raise ValueError(f"a sampling grid needs at least 2 points, got {steps}")
    return shift_timesteps(1 - torch.linspace(0.0, t_end, steps), alpha)


def _times(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)


@torch.no_grad()
def euler_sample(velocity_fn: VelocityFn, noise: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Euler ODE from `noise` at grid[0] through the grid: len(grid) - 1 steps, one velocity call each.

    The state at grid[-1] is returned as is (no final jump to t = 0), as the reference sampler does.
    """
    x = noise
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        x = x + (t_next - t_cur) * velocity_fn(x, _times(t_cur, x))
    return x


@torch.no_grad()
def heun_sample(velocity_fn: VelocityFn, noise: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Heun (explicit trapezoid, 2nd order) over the same grid as `euler_sample`.

    Each step: d1 = v(x, t), x' = x + dt d1, d2 = v(x', t_next), x += dt (d1 + d2) / 2. A step that
    ends exactly at t = 0 is a plain Euler step (the EDM convention: it saves the evaluation at the
    data end, where a correction buys nothing). On the reference grid, which stops at
    shift(0.001) > 0, every step is Heun: 2 (len(grid) - 1) velocity calls.
    """
    x = noise
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        dt = t_next - t_cur
        d1 = velocity_fn(x, _times(t_cur, x))
        x_euler = x + dt * d1
        if float(t_next) == 0.0:
            x = x_euler
        else:
            x = x + dt * 0.5 * (d1 + velocity_fn(x_euler, _times(t_next, x)))
    return x


# ----------------------------------------------------------------------------- guidance


def guided_velocity_fn(
    model: Callable[..., torch.Tensor],
    y: torch.Tensor,
    *,
    cfg_scale: float = 1.0,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
    null_label: int = 1000,
    weak_model: Callable[..., torch.Tensor] | None = None,
    ag_scale: float | None = None,
) -> VelocityFn:
    """The sampler's velocity (x, t) -> v for labels y (B,), with CFG or AutoGuidance in an interval.

    Guidance applies to the samples whose t lies in [t_min, t_max] = cfg_interval, both ends
    inclusive; the others get the plain conditional `model(x, t, y)`.
    - CFG (cfg_scale != 1): u + s (c - u) on all channels, c and u from ONE forward of the batch
      [cond; uncond] (uncond labels = null_label). Only the samples inside the interval are
      duplicated, so a step with no sample inside costs one conditional forward.
    - AutoGuidance (weak_model and ag_scale given): weak + s (main - weak), the weak model getting
      the same conditional labels; with ag_scale 1, or outside the interval, the main model alone.
    Models must be in eval mode (train mode would drop labels at random).
    """
    if weak_model is not None and ag_scale is None:
        raise ValueError("AutoGuidance needs ag_scale together with weak_model")
    if ag_scale is not None and weak_model is None:
        raise ValueError("ag_scale is given but weak_model is None")
    if weak_model is not None and cfg_scale != 1.0:
        raise ValueError("use either CFG (cfg_scale) or AutoGuidance (weak_model, ag_scale), not both")
    for m in (model, weak_model):
        if isinstance(m, nn.Module) and m.training:
            raise ValueError(f"{type(m).__name__} is in train mode; call .eval() before sampling")
    t_min, t_max = cfg_interval
    guided = weak_model is not None
    scale = ag_scale if guided else cfg_scale

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        inside = ((t >= t_min) & (t <= t_max)).nonzero(as_tuple=True)[0]
        if scale == 1.0 or inside.numel() == 0:
            return model(x, t, y)
        if guided:
            main = model(x, t, y)
            weak = weak_model(x[inside], t[inside], y[inside])
            out = main.clone()
            out[inside] = weak + scale * (main[inside] - weak)
            return out
        n = x.shape[0]
        null = torch.full_like(y[inside], null_label)
        both = model(torch.cat([x, x[inside]]), torch.cat([t, t[inside]]), torch.cat([y, null]))
        cond, uncond = both[:n], both[n:]
        out = cond.clone()
        out[inside] = uncond + scale * (cond[inside] - uncond)
        return out

    return velocity
