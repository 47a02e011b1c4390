"""Option choices that several commands share (typer shows them as ``[a|b|c]``)."""
from __future__ import annotations

from enum import Enum


class EncoderChoice(str, Enum):
    dinov2 = "dinov2"
    siglip2 = "siglip2"
    mae = "mae"
    siglip = "siglip"  # alias of siglip2


class WeightsChoice(str, Enum):
    """Which weights of a checkpoint: the EMA's or the trained model's."""

    ema = "ema"
    model = "model"


class DeviceChoice(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
