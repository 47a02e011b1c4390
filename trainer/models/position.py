"""The fixed 2-D sin-cos position table that DiT^DH / DiT (``pos_embed``) and the RAE decoder
(``decoder_pos_embed``) share (docs/checkpoint-format.md, sections 2 and 3)."""
from __future__ import annotations

import torch


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """2-D sin-cos position table, float64 [grid_size**2, dim].

    Token k sits at row ``k // grid_size``, column ``k % grid_size``. The first dim/2 channels
    encode the **column**, the second dim/2 the **row**; each half is ``[sin(pos * w_i)]_i`` then
    ``[cos(pos * w_i)]_i`` for i < dim/4, with ``w_i = 10000 ** (-i / (dim / 4))``. This is the
    reference's (MAE numpy) layout, also used by the DiT ``pos_embed``.
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64, device="cpu") / quarter)
    pos = torch.arange(grid_size, dtype=torch.float64, device="cpu")
    rows = pos.repeat_interleave(grid_size)  # (G*G,) row of token k
    cols = pos.repeat(grid_size)  # (G*G,) column of token k

    def half(coord: torch.Tensor) -> torch.Tensor:
        angles = coord[:, None] * omega[None, :]  # (G*G, D/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (G*G, D/2)

    return torch.cat([half(cols), half(rows)], dim=1)  # (G*G, D)
