"""The rotation trick (Fifty et al. 2024, "Restructuring Vector Quantization with the Rotation Trick").

A VQ layer's forward output is its code e; straight-through copies the gradient of e onto the
encoder output x unchanged, so it ignores where x sits relative to e. The rotation trick
writes e as a rotation plus rescaling of x, e = λ R x, with R the rotation taking the
direction of x onto the direction of e (in the plane the two span) and λ = ||e|| / ||x||,
and treats λ R as a constant: the encoder receives λ R · ∂L/∂e, a gradient that carries the
angle and the length ratio between x and its code. No matrix is built (§4.2 of the paper):

    R x = x − 2 (x·w) w + 2 (x·u) q,   u = x/||x||, q = e/||e||, w = (u + q)/||u + q||

Shapes: N vectors of D channels; channel-first maps (B, D, h, w) work alike (channels on dim 1).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

# Norms below this count as zero (a zero vector has no direction to rotate).
_EPS = 1e-12


def rotate_onto(x: Tensor, e: Tensor) -> Tensor:
    """x (N, D), e (N, D) float → λ R x (N, D): equal to e up to rounding, with gradient
    λ R · g to ``x`` (λ and R are constants; nothing reaches ``e``).

    ``x`` is rotated onto the direction of ``e`` and rescaled to its norm. Where u = −q exactly
    (a code diametrically opposite x) the plane is undefined and w = 0: R is then a reflection
    plus 2 q uᵀ; such ties have measure zero.
    """
    x_norm = x.detach().norm(dim=1, keepdim=True).clamp_min(_EPS)  # (N, 1)
    e = e.detach()
    e_norm = e.norm(dim=1, keepdim=True).clamp_min(_EPS)
    u, q = x.detach() / x_norm, e / e_norm  # (N, D) unit directions
    w = F.normalize(u + q, dim=1, eps=_EPS)  # (N, D) bisector of u and q
    rotated = x - 2 * (x * w).sum(1, keepdim=True) * w + 2 * (x * u).sum(1, keepdim=True) * q
    return rotated * (e_norm / x_norm)


def rotation_trick(x: Tensor, e: Tensor, straight_through: Tensor) -> Tensor:
    """``straight_through``'s value, bit for bit, with the rotation trick's gradient to ``x``.

    x: (N, D) encoder output (differentiable); e: (N, D) its codes; straight_through: (N, D)
    the layer's straight-through output x + sg(e − x). The result's forward value is exactly
    that output (a zero-valued term carries the gradient), so switching the trick on changes
    gradients only, never a token or a reconstruction.
    """
    rotated = rotate_onto(x, e)
    return straight_through.detach() + (rotated - rotated.detach())
