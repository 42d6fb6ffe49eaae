"""Rectified-flow samplers. Convention: x_t = (1 - t) * x0 + t * noise, the model predicts v = noise - x0, and
sampling integrates t from 1 to 0."""
from __future__ import annotations

import math

import torch


SHIFT_RANGE = (0.01, 100.0)  # beyond it nearly every step sits at t ~ 0 or t ~ 1 (and 1e-320 divides by zero)


def flow_timesteps(steps: int, shift: float = 1.0) -> list[float]:
    """steps + 1 times from 1 to 0, warped by the SD3/Wan time shift t' = s t / (1 + (s - 1) t)."""
    if steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {steps}")
    if not SHIFT_RANGE[0] <= shift <= SHIFT_RANGE[1]:  # also refuses NaN
        raise ValueError(f"shift must be {SHIFT_RANGE[0]:g} to {SHIFT_RANGE[1]:g} (1 = no shift), got {shift}")
    ts = [1.0 - i / steps for i in range(steps + 1)]
    return [shift * t / (1 + (shift - 1) * t) for t in ts]


class FlowEuler:
    """First-order Euler on the velocity field."""
    name = "euler"

    def __init__(self, steps: int, shift: float = 1.0):
        self.timesteps = flow_timesteps(steps, shift)

    def reset(self):
        pass

    def step(self, i: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return x + (self.timesteps[i + 1] - self.timesteps[i]) * v


class FlowDPMSolver2M:
    """DPM-Solver++(2M) in data-prediction form with alpha_t = 1 - t, sigma_t = t (multistep, second order).

    Uses the x0 prediction x - t v of the current and previous step; first order on the first step, at t = 1
    (where lambda = -inf) and on the final step to t = 0, which returns the x0 prediction."""
    name = "dpm++2m"

    def __init__(self, steps: int, shift: float = 1.0):
        self.timesteps = flow_timesteps(steps, shift)
        self.reset()

    def reset(self):
        self._prev_x0, self._prev_h = None, None

    @staticmethod
    def _lambda(t: float) -> float:
        return math.log((1 - t) / t) if 0 < t < 1 else (-math.inf if t >= 1 else math.inf)

    def step(self, i: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t, t_next = self.timesteps[i], self.timesteps[i + 1]
        x0 = x - t * v
        if t_next <= 0:
            self.reset()
            return x0
        h = self._lambda(t_next) - self._lambda(t)
        if math.isfinite(h) and self._prev_x0 is not None and math.isfinite(self._prev_h):
            r = self._prev_h / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * self._prev_x0
        else:
            d = x0
        coef = -math.expm1(-h) if math.isfinite(h) else 1.0  # 1 - e^{-h}
        out = (t_next / t) * x + (1 - t_next) * coef * d
        self._prev_x0, self._prev_h = x0, h
        return out


SOLVERS = {"euler": FlowEuler, "dpm++2m": FlowDPMSolver2M}


def make_solver(name: str, steps: int, shift: float = 1.0):
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}")
    return SOLVERS[name](steps, shift)
