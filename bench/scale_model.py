"""The arithmetic of the ``scale`` bench item: power-law projections from two measured sizes, the
ImageNet-1k and 4-node cluster targets, and the FLOPs of the DINOv2-B forward that set how many CPU
cores the encode needs per GPU. Pure functions: no measurement happens here.

A figure measured at n1 and n2 (n1 < n2) with values v1 and v2 is projected to N as the larger of
the power law with the fitted exponent, ``v2 * (N / n2) ** b`` with ``b = ln(v2 / v1) / ln(n2 / n1)``,
and the straight line through the two points, ``v2 + (v2 - v1) * (N - n2) / (n2 - n1)``. The power
law carries a superlinear cost (b > 1) on to N instead of assuming linearity; the line keeps a cost
with a fixed part (v = a + c n, for which the fitted b < 1 would bend the projection far below the
truth) from being underestimated. For a pure power law with b >= 1 the power law is the larger.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

IMAGENET_TRAIN = 1_281_167  # ImageNet-1k train images (both orientations: image + horizontal flip)
# One DINOv2-B latent at 256 px: [768, 16, 16] in float16.
LATENT_SHAPE = (768, 16, 16)
LATENT_BYTES = 768 * 16 * 16 * 2
ORIENTATIONS = 2  # the image and its horizontal flip, both encoded and stored

# The cluster of the projections: 4 nodes of 8 H100 SXM GPUs and 96 CPU cores (e.g. 2 x 48-core CPUs).
CLUSTER_NODES = 4
GPUS_PER_NODE = 8
CORES_PER_NODE = 96

# Assumptions for the GPU side (no GPU on the machine that measures): H100 SXM dense peaks and the
# share of it a ViT-B forward sustains.
H100_PEAK_TFLOPS = {"float32": 67.0, "tf32": 494.7, "bfloat16": 989.4}
GPU_UTILISATION = 0.40


@dataclass(frozen=True)
class Projection:
    """A figure measured at two sizes and projected to ``target_n`` by its fitted exponent."""

    name: str
    unit: str
    n1: float
    v1: float
    n2: float
    v2: float
    target_n: float

    @property
    def exponent(self) -> float:
        if self.v1 <= 0 or self.v2 <= 0:
            return 1.0 if self.v2 > 0 else 0.0  # no fit without two positive values: linear, stated
        return math.log(self.v2 / self.v1) / math.log(self.n2 / self.n1)

    @property
    def power(self) -> float:
        return self.v2 * (self.target_n / self.n2) ** self.exponent

    @property
    def line(self) -> float:
        return self.v2 + (self.v2 - self.v1) * (self.target_n - self.n2) / (self.n2 - self.n1)

    @property
    def value(self) -> float:
        return max(self.power, self.line)

    def formula(self) -> str:
        b, unit = self.exponent, self.unit
        return (f"max(power law {_g(self.v2)} x ({self.target_n:,.0f} / {self.n2:,.0f}) ^ {b:.3f} = {_g(self.power)}, "
                f"line {_g(self.v2)} + ({_g(self.v2)} - {_g(self.v1)}) x ({self.target_n:,.0f} - {self.n2:,.0f}) / "
                f"({self.n2:,.0f} - {self.n1:,.0f}) = {_g(self.line)}) = {_g(self.value)} {unit}; "
                f"b = ln({_g(self.v2)} / {_g(self.v1)}) / ln({self.n2:,.0f} / {self.n1:,.0f})")

    def to_dict(self) -> dict:
        return {"name": self.name, "unit": self.unit,
                "measured": {f"{self.n1:.0f}": _r(self.v1), f"{self.n2:.0f}": _r(self.v2)},
                "exponent": _r(self.exponent, 4), "projected_to": self.target_n, "projected": _r(self.value),
                "power_law": _r(self.power), "line": _r(self.line), "formula": self.formula()}


def _g(x: float) -> str:
    return f"{x:.4g}"


def _r(x: float, digits: int = 6) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def vit_forward_flops(depth: int = 12, dim: int = 768, mlp_ratio: float = 4.0, image: int = 224, patch: int = 14,
                      prefix_tokens: int = 5) -> float:
    """FLOPs (2 per multiply-add) of one ViT forward on one image: patch embedding, then per block
    the qkv and output projections (4 N D^2), attention scores and weighted sum (2 N^2 D) and the MLP
    (2 mlp_ratio N D^2); N = patches + prefix tokens (DINOv2-B reg4: class + 4 registers).
    LayerNorms, softmax and biases (O(N D)) are left out (< 1%)."""
    patches = (image // patch) ** 2
    n = patches + prefix_tokens
    embed = patches * 3 * patch * patch * dim
    block = 4 * n * dim * dim + 2 * n * n * dim + 2 * mlp_ratio * n * dim * dim
    return 2.0 * (embed + depth * block)


def gpu_images_per_s(precision: str, utilisation: float = GPU_UTILISATION, forwards: int = ORIENTATIONS) -> float:
    """Images/s of one H100 SXM encoding DINOv2-B at 256 px (224 px encoder input), ``forwards``
    forwards per image, at ``utilisation`` of the dense peak of ``precision`` (an assumption)."""
    return H100_PEAK_TFLOPS[precision] * 1e12 * utilisation / (forwards * vit_forward_flops())


def cores_per_gpu(cpu_seconds_per_image: float, precision: str) -> float:
    """CPU cores that keep one GPU fed: its images/s times the CPU seconds each image costs."""
    return gpu_images_per_s(precision) * cpu_seconds_per_image


def imagenet_bytes(orientations: int = ORIENTATIONS) -> int:
    """Latent bytes of ImageNet-1k train at rest before compression: N x orientations x [768, 16, 16] fp16."""
    return IMAGENET_TRAIN * orientations * LATENT_BYTES


__all__ = ["CLUSTER_NODES", "CORES_PER_NODE", "GPUS_PER_NODE", "GPU_UTILISATION", "H100_PEAK_TFLOPS",
           "IMAGENET_TRAIN", "LATENT_BYTES", "LATENT_SHAPE", "ORIENTATIONS", "Projection", "cores_per_gpu",
           "gpu_images_per_s", "imagenet_bytes", "vit_forward_flops"]
