"""Calibration of a removal step size against retrained clusters (DESIGN.md, "Calibration")."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from ddm_ops.attribution import distances

log = logging.getLogger(__name__)

STEP_GRID = tuple(float(s) for s in np.geomspace(1e-5, 1e-1, 25))  # SGD learning rates
NEWTON_STEP_GRID = tuple(float(s) for s in np.geomspace(1e-3, 10, 25))  # multiples of the influence-function step


def dist1_to(truth: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Dist1 between paired models' outputs, averaged over test samples: truth, logits (n, M, C) -> (n,)."""
    return torch.stack([distances(t, o[None])["dist1"].mean() for t, o in zip(truth, logits)])


def calibrate_step(
    remove: Callable[[float], torch.Tensor],
    truth: torch.Tensor,
    base: torch.Tensor,
    grid: tuple[float, ...] = STEP_GRID,
) -> tuple[float, list[dict]]:
    """The step size on `grid` whose removed models come closest to the retrained ones, relative to doing nothing.

    remove(step) returns the removed models' test logits (n, M, C) for the n calibration clusters; truth (n, M, C)
    holds the logits of the models retrained without them and base (M, C) those of the model they are removed from.
    Each cluster's Dist1 to its retraining is divided by its do-nothing Dist1 (base to that retraining) before the
    mean over clusters, so one cluster whose removal explodes at large steps cannot drag the step down for the others
    by its raw size alone (digits_seed1_k50: mean raw Dist1 chose 0.001, 0.99x doing nothing on the evaluation
    clusters; the relative mean 0.0215, 0.86x). Returns the step and the curve (relative and raw mean Dist1).
    A step at the grid's smallest end is logged as a warning: no removal came closer to the retrained models than
    (almost) doing nothing, so the removed models are no counterfactuals to trust, though the ranking of clusters
    may still be; at the largest end, larger steps were not tried.
    """
    nothing = dist1_to(truth, base.expand_as(truth))
    curve = []
    for s in grid:
        dist1 = dist1_to(truth, remove(s))
        curve.append({"step_size": s, "relative": float((dist1 / nothing).mean()), "dist1": float(dist1.mean())})
    best = min(curve, key=lambda row: row["relative"] if np.isfinite(row["relative"]) else np.inf)  # overflowed: worst
    if len(grid) > 1 and best["step_size"] in (grid[0], grid[-1]):
        smallest = best["step_size"] == grid[0]
        log.warning(
            "calibrated step %.3g is the %s of the grid %.3g to %.3g (Dist1 to the retrained calibration clusters "
            "%.3f x doing nothing there, %.3f x at the other end): %s",
            best["step_size"],
            "smallest" if smallest else "largest",
            grid[0],
            grid[-1],
            best["relative"],
            curve[-1 if smallest else 0]["relative"],
            "no removal came closer to the retrained models than (almost) doing nothing"
            if smallest
            else "larger steps were not tried",
        )
    return best["step_size"], curve
