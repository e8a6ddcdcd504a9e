"""Linear interpolation on a sorted grid, clamped at its ends: the one helper behind everything
interpolated in log σ (a schedule's ρ between its σ knots, a discrete model's σ between its
timesteps, and the timestep of a σ)."""

from __future__ import annotations

import torch


def bracket(xs: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where ``x`` falls on the increasing grid ``xs``: for each value, the index k (1 ≤ k <
    len(xs)) with xs[k-1] ≤ x ≤ xs[k] and the weight w ∈ [0, 1] of xs[k]. Values outside the grid
    are clamped to its ends (w = 0 at the first point, 1 at the last)."""
    x = x.clamp(xs[0], xs[-1])
    k = torch.searchsorted(xs, x).clamp(1, len(xs) - 1)
    return k, (x - xs[k - 1]) / (xs[k] - xs[k - 1])


def interp(xs: torch.Tensor, ys: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """ys (its last dimension along ``xs``) interpolated linearly at ``x``, clamped outside."""
    k, w = bracket(xs, x)
    return ys[..., k - 1] + w * (ys[..., k] - ys[..., k - 1])


def interp_log_sigma(log_knots: torch.Tensor, table: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``table`` (its last dimension along the σ knots, ``log_knots`` their log σ, float64)
    interpolated in log σ at ``sigma`` (a number's tensor, or one σ per sample), clamped outside
    the knots: a schedule's ρ between its knots."""
    return interp(log_knots, table, sigma.to(torch.float64).clamp_min(1e-30).log())
