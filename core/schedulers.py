"""Rectified-flow samplers. Convention: x_t = (1 - t) * x0 + t * noise, the model predicts v = noise - x0, and
sampling integrates t from 1 to 0.

Every solver has `timesteps` (the steps + 1 noise levels sigma, from ~1 to 0) and `model_t` (the steps values the
DiT is given: sigma itself unless a diffusers schedule says otherwise, e.g. Wan's UniPC gives int(1000 sigma))."""
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


def _check_schedule(sigmas, model_t) -> tuple[list[float], list[float]]:
    """Explicit schedule: steps + 1 strictly decreasing sigmas in [0, 1] and the steps DiT timesteps (default: sigma)."""
    sigmas = [float(s) for s in sigmas]
    model_t = sigmas[:-1] if model_t is None else [float(t) for t in model_t]
    if len(sigmas) < 2 or len(model_t) != len(sigmas) - 1:
        raise ValueError(f"need steps + 1 >= 2 sigmas and steps model_t, got {len(sigmas)} and {len(model_t)}")
    if not (sigmas[0] <= 1 and sigmas[-1] >= 0 and all(a > b for a, b in zip(sigmas, sigmas[1:]))):
        raise ValueError(f"sigmas must decrease strictly within [0, 1], got {sigmas}")
    return sigmas, model_t


class FlowEuler:
    """First-order Euler on the velocity field."""
    name = "euler"

    def __init__(self, steps: int, shift: float = 1.0):
        self.timesteps = flow_timesteps(steps, shift)
        self.model_t = self.timesteps[:-1]

    @classmethod
    def from_sigmas(cls, sigmas: list[float], model_t: list[float] | None = None) -> "FlowEuler":
        """An explicit schedule: steps + 1 sigmas and the steps DiT timesteps (default: the sigmas)."""
        self = cls.__new__(cls)
        self.timesteps, self.model_t = _check_schedule(sigmas, model_t)
        return self

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
        self.model_t = self.timesteps[:-1]
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


class FlowUniPC:
    """UniPC multistep (Zhao et al. 2023) in data-prediction form for flow models, on an explicit schedule:
    alpha = 1 - sigma, lambda = log(alpha / sigma), x0 = x - sigma v, B(h) = e^h - 1 ("bh2") or h ("bh1").

    Step i first corrects x with the new x0 (UniC, of the previous predictor's order; skipped for i - 1 in
    disable_corrector), then predicts the next x (UniP) of order min(order, i + 1), lowered to steps - i near the
    end when lower_order_final; a step to sigma = 0 is first order and returns x0 (where diffusers, without
    lower_order_final or with bh1, gives NaN). This is diffusers' UniPCMultistepScheduler with
    prediction_type="flow_prediction", use_flow_sigmas=True, predict_x0=True (whose schedule starts at 1 - 1e-6:
    sigma = 1 has lambda = -inf and is refused here)."""
    name = "unipc"

    def __init__(self, sigmas: list[float], model_t: list[float] | None = None, order: int = 2,
                 solver_type: str = "bh2", lower_order_final: bool = True, disable_corrector=()):
        self.timesteps, self.model_t = _check_schedule(sigmas, model_t)
        if self.timesteps[0] >= 1 or order < 1 or solver_type not in ("bh1", "bh2"):
            raise ValueError(f"UniPC needs sigmas[0] < 1, order >= 1, solver_type bh1 or bh2; got "
                             f"{self.timesteps[0]}, {order}, {solver_type!r}")
        self.order, self.solver_type, self.lower_order_final = order, solver_type, lower_order_final
        self.disable_corrector = set(disable_corrector)
        self.reset()

    def reset(self):
        # x0 predictions (newest last, at sigmas[i], [i - 1], ...), the x before the last predictor, its order
        self._x0s, self._last_x, self._last_order = [], None, 0

    @staticmethod
    def _lambda(s: float) -> float:
        return math.log1p(-s) - math.log(s) if s > 0 else math.inf

    def _update(self, j: int, x: torch.Tensor, order: int, x0_new: torch.Tensor | None = None) -> torch.Tensor:
        """x at sigmas[j] -> x at sigmas[j + 1] from the history's x0s at sigmas[j], [j - 1], ...: the predictor
        (x0_new None, x0s[-1] at sigmas[j]), or the corrector that also uses x0_new, the x0 at sigmas[j + 1]."""
        s0, s1 = self.timesteps[j], self.timesteps[j + 1]
        lam0 = self._lambda(s0)
        h = self._lambda(s1) - lam0
        m0 = self._x0s[-1]
        rks = [(self._lambda(self.timesteps[j - k]) - lam0) / h for k in range(1, order)]
        ds = [(self._x0s[-1 - k] - m0) / r for k, r in enumerate(rks, 1)]
        h_phi = math.expm1(-h)  # e^{-h} - 1
        b_h = h_phi if self.solver_type == "bh2" else -h
        b, g, fact = [], h_phi / -h - 1, 1  # b_k = k! (-h) phi_{k+1}(-h) / B(h)
        for k in range(1, order + 1):
            b.append(g * fact / b_h)
            fact *= k + 1
            g = g / -h - 1 / fact
        if x0_new is not None:  # corrector: solve with the new point r = 1 included
            ds.append(x0_new - m0)
            rhos = [0.5] if order == 1 else self._solve([[r ** p for r in rks + [1.0]] for p in range(order)], b)
        else:
            rhos = [0.5] if order == 2 else self._solve([[r ** p for r in rks] for p in range(order - 1)], b[:-1]) \
                if order > 2 else []
        out = (s1 / s0) * x - ((1 - s1) * h_phi) * m0
        for rho, d in zip(rhos, ds):
            out = out - ((1 - s1) * b_h * rho) * d
        return out

    @staticmethod
    def _solve(a, b) -> list[float]:
        return torch.linalg.solve(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)).tolist()

    def step(self, i: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        steps = len(self.timesteps) - 1
        if i == 0:
            self.reset()
        x0 = x - self.timesteps[i] * v
        if i > 0 and self._last_x is not None and i - 1 not in self.disable_corrector:
            x = self._update(i - 1, self._last_x, self._last_order, x0)
        self._x0s = (self._x0s + [x0])[-self.order:]
        order = min(self.order, steps - i) if self.lower_order_final else self.order
        order = 1 if self.timesteps[i + 1] <= 0 else min(order, len(self._x0s))  # warm-up: as many x0s as there are
        self._last_x, self._last_order = x, order
        out = self._update(i, x, order)
        if i == steps - 1:
            self.reset()
        return out


SOLVERS = {"euler": FlowEuler, "dpm++2m": FlowDPMSolver2M}


def make_solver(name: str, steps: int, shift: float = 1.0):
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}")
    return SOLVERS[name](steps, shift)


def solver_from_diffusers(config: dict, steps: int, shift: float | None = None, mu: float | None = None,
                          sigmas=None):
    """The solver for a diffusers scheduler config (e.g. a Wan checkpoint's scheduler/scheduler_config.json) on
    exactly diffusers' schedule: the sigmas and DiT timesteps of scheduler.set_timesteps(steps). shift, when given,
    replaces the config's flow_shift (UniPC) or shift (flow-match Euler). mu and sigmas (flow-match Euler) are passed
    to set_timesteps as a pipeline passes them: mu is required by use_dynamic_shifting (e.g. LTXPipeline: mu from the
    video's sequence length, sigmas linspace(1, 1 / steps, steps))."""
    import diffusers  # optional dependency

    kind = config.get("_class_name")
    supported = ("FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler (prediction_type flow_prediction, "
                 "use_flow_sigmas, predict_x0)")
    if kind not in ("FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler"):
        raise ValueError(f"unsupported scheduler {kind!r}; supported: {supported}")
    if steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {steps}")
    unipc = kind == "UniPCMultistepScheduler"
    overrides = {} if shift is None else {"flow_shift" if unipc else "shift": float(shift)}
    sched = getattr(diffusers, kind).from_config(config, **overrides)
    c = sched.config
    if unipc:
        ok = (c.prediction_type == "flow_prediction" and c.use_flow_sigmas and c.predict_x0 and not c.thresholding
              and not c.use_dynamic_shifting and c.solver_type in ("bh1", "bh2") and c.final_sigmas_type == "zero")
    else:
        ok = not ((c.use_dynamic_shifting and mu is None) or c.stochastic_sampling or c.invert_sigmas)
    if unipc and (mu is not None or sigmas is not None):
        raise ValueError("mu and sigmas are FlowMatchEulerDiscreteScheduler arguments; UniPC takes neither")
    if not ok:
        raise ValueError(f"unsupported {kind} settings (dynamic shifting without mu, stochastic sampling, inverted "
                         f"sigmas, thresholding, non-flow prediction, final sigma not zero); supported: {supported}")
    if mu is None and sigmas is None:
        sched.set_timesteps(steps)
    else:
        sched.set_timesteps(steps, sigmas=None if sigmas is None else [float(x) for x in sigmas], mu=mu)
    sigmas, model_t = sched.sigmas.tolist(), [float(t) for t in sched.timesteps.tolist()]
    if not unipc:
        return FlowEuler.from_sigmas(sigmas, model_t)
    return FlowUniPC(sigmas, model_t, c.solver_order, c.solver_type, c.lower_order_final, c.disable_corrector)
