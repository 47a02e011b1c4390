"""Optimizer, EMA, learning-rate schedules, gradient clipping and the non-finite loss guard.

Reference settings (docs/method.md): AdamW lr 2e-4, betas (0.9, 0.95), weight decay 0.
DiT^DH: constant LR for 40 epochs, then linear decay to 2e-5 by epoch 800, clip 1.0, EMA 0.9995.
Decoder: 1 warm-up epoch, then cosine to 2e-5 by the last (16th) epoch, no clipping, EMA 0.9978.

Schedules are functions of the optimizer step (what ``LambdaLR`` passes) returning the factor on
the base LR. They count epochs as ``step * global_batch_size / samples_per_epoch`` (fractional),
so they do not depend on how a partial last batch of an epoch is handled.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable

import torch
from torch import nn

from schemas.errors import UserError
from trainer.checkpoint import unwrap_model

REFERENCE_LR = 2e-4
REFERENCE_BETAS = (0.9, 0.95)
REFERENCE_WEIGHT_DECAY = 0.0


def build_adamw(
    model_or_params: nn.Module | Iterable[torch.nn.Parameter],
    lr: float = REFERENCE_LR,
    betas: tuple[float, float] = REFERENCE_BETAS,
    weight_decay: float = REFERENCE_WEIGHT_DECAY,
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (``requires_grad``) of a module, or over given params."""
    if isinstance(model_or_params, nn.Module):
        params = [p for p in model_or_params.parameters() if p.requires_grad]
    else:
        params = list(model_or_params)
    if not params:
        raise ValueError("no trainable parameters to optimize")
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps)


class EMA:
    """Exponential moving average of a model's weights, kept in fp32 on the model's device.

    ``shadow = decay * shadow + (1 - decay) * param`` after each optimizer step, for every
    floating-point parameter (frozen ones included: they do not move, so their average is
    themselves). Buffers are copied, not averaged. ``state_dict()`` has the model's own keys, so it
    loads into a fresh model with ``load_state_dict`` and is what sampling uses. Build it after
    the model is on its device: the shadow lives where the weights were at construction.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        model = unwrap_model(model)
        # remove_duplicate=False: every key of a tied weight is averaged, not only the first.
        self._param_names = [
            name for name, p in model.named_parameters(remove_duplicate=False) if p.is_floating_point()
        ]
        self.shadow: dict[str, torch.Tensor] = {}
        for name, value in model.state_dict().items():
            value = value.detach()
            self.shadow[name] = value.float().clone() if value.is_floating_point() else value.clone()

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model``'s current weights (call after ``optimizer.step()``)."""
        model = unwrap_model(model)
        params = dict(model.named_parameters(remove_duplicate=False))
        shadows = [self.shadow[n] for n in self._param_names]
        currents = [params[n].detach().float() for n in self._param_names]
        if shadows:
            # lerp: shadow + (1 - decay) * (param - shadow), fused over all tensors.
            torch._foreach_lerp_(shadows, currents, 1.0 - self.decay)
        for name, buf in model.named_buffers():
            if name in self.shadow:
                self.shadow[name].copy_(buf.detach())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights with the model's keys (fp32 for floating-point entries)."""
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = set(self.shadow) - set(state), set(state) - set(self.shadow)
        if missing or unexpected:
            raise ValueError(
                f"EMA state does not match the model: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        for name, value in state.items():
            if tuple(value.shape) != tuple(self.shadow[name].shape):
                raise ValueError(f"EMA state {name!r} has shape {tuple(value.shape)}, model has {tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(value)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (cast to its dtypes)."""
        unwrap_model(model).load_state_dict(self.shadow)


@dataclasses.dataclass
class _EpochSchedule:
    """Shared units of the schedules: epochs of ``samples_per_epoch`` samples at
    ``global_batch_size`` samples per optimizer step; factors relative to ``base_lr``."""

    samples_per_epoch: int
    global_batch_size: int
    base_lr: float = REFERENCE_LR
    final_lr: float = 2e-5

    def __post_init__(self):
        if self.samples_per_epoch <= 0 or self.global_batch_size <= 0:
            raise ValueError(
                f"samples_per_epoch ({self.samples_per_epoch}) and global_batch_size "
                f"({self.global_batch_size}) must be positive"
            )
        if self.base_lr <= 0:
            raise ValueError(f"base_lr must be positive, got {self.base_lr}")

    def steps(self, epochs: float) -> float:
        """Optimizer steps in ``epochs`` epochs (fractional)."""
        return epochs * self.samples_per_epoch / self.global_batch_size

    @property
    def final_factor(self) -> float:
        return self.final_lr / self.base_lr


@dataclasses.dataclass
class DiTLRSchedule(_EpochSchedule):
    """Reference DiT^DH schedule as a LambdaLR factor: 1 for ``constant_epochs``, then linear to
    ``final_lr / base_lr`` at ``end_epoch``, constant after. A callable object (not a closure)
    so ``LambdaLR.state_dict()`` stores its fields."""

    constant_epochs: float = 40.0
    end_epoch: float = 800.0

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.constant_epochs <= self.end_epoch:
            raise ValueError(f"need 0 <= constant_epochs ({self.constant_epochs}) <= end_epoch ({self.end_epoch})")

    def __call__(self, step: int) -> float:
        start, end = self.steps(self.constant_epochs), self.steps(self.end_epoch)
        if step <= start:
            return 1.0
        if step >= end:
            return self.final_factor
        return 1.0 + (self.final_factor - 1.0) * (step - start) / (end - start)


@dataclasses.dataclass
class DecoderLRSchedule(_EpochSchedule):
    """Reference decoder schedule as a LambdaLR factor: linear warm-up over ``warmup_epochs``
    (the first step already gets ``1 / warmup_steps``, never 0), then cosine from 1 down to
    ``final_lr / base_lr`` at ``total_epochs``, constant after."""

    warmup_epochs: float = 1.0
    total_epochs: float = 16.0

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.warmup_epochs < self.total_epochs:
            raise ValueError(f"need 0 <= warmup_epochs ({self.warmup_epochs}) < total_epochs ({self.total_epochs})")

    def __call__(self, step: int) -> float:
        warmup, total = self.steps(self.warmup_epochs), self.steps(self.total_epochs)
        if step < warmup:
            return min(1.0, (step + 1) / warmup)
        progress = min(1.0, (step - warmup) / (total - warmup))
        return self.final_factor + (1.0 - self.final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, schedule: DiTLRSchedule | DecoderLRSchedule
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR driving ``optimizer`` with ``schedule``; the optimizer's LR must be the schedule's
    ``base_lr`` (the factor is relative to it). Step it once per optimizer step.

    On resume, build the scheduler on the fresh optimizer first, then load the optimizer state,
    then the scheduler state: ``LambdaLR.load_state_dict`` does not set the optimizer's LR, the
    optimizer state does (building the scheduler after loading would run the first resumed step
    at the step-0 LR)."""
    for group in optimizer.param_groups:
        lr = group.get("initial_lr", group["lr"])
        if not math.isclose(lr, schedule.base_lr, rel_tol=1e-9):
            raise ValueError(f"optimizer lr {lr} differs from the schedule's base_lr {schedule.base_lr}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=schedule)


def clip_grad_norm(parameters: Iterable[torch.Tensor] | nn.Module, max_norm: float | None) -> torch.Tensor:
    """Clip the global L2 gradient norm to ``max_norm`` (None or <= 0: measure only) and return
    the norm before clipping as a 0-d tensor (no host sync; call ``.item()`` when logging)."""
    if isinstance(parameters, nn.Module):
        parameters = parameters.parameters()
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    limit = float(max_norm) if max_norm is not None and max_norm > 0 else math.inf
    return torch.nn.utils.clip_grad_norm_(params, limit)


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss (or another watched value) became NaN or infinite: training must stop without
    saving, so the newest complete checkpoint in the run directory stays the last good one."""

    def __init__(self, step: int, value: float, what: str = "loss"):
        self.step, self.value, self.what = step, value, what
        super().__init__(
            f"non-finite {what} ({value}) at step {step}: training stopped without saving a "
            "checkpoint; the newest complete checkpoint in the run directory is the last good one "
            "(resume from it, e.g. with a lower learning rate or gradient clipping)"
        )


def check_finite(value: torch.Tensor | float, step: int, what: str = "loss") -> float:
    """Return ``value`` as a float, or raise :class:`NonFiniteLossError` if it is NaN/inf.
    A tensor costs one host sync."""
    v = float(value.detach().float().item()) if isinstance(value, torch.Tensor) else float(value)
    if not math.isfinite(v):
        raise NonFiniteLossError(step, v, what)
    return v
