"""CUDA graph of one whole denoising step: DiT call + CFG combine + Euler update, captured once per shape after
warm-up, with static buffers, then replayed for every step (host work per step: two scalar fills and a replay).

    pipe = Pipeline("vidrt-wan2.1-1.3b", device="cuda", dtype=torch.bfloat16); pipe.cuda_graphs = True
    pipe(prompt)   # captures on the first call of each shape, replays after; falls back (logged) when it cannot

Works for torch modules and TensorRT engines: TrtPart runs on its own stream, which joins the capture (fork/join on
events); each captured shape has its own execution context, kept for its graph, and the shared scratch is pinned
once a graph holds it (core/backends.py). Falls back, with the reason in `pipe.graph_fallback`, on CPU, for
onnxruntime parts, for multistep solvers (their history lives on the host) and when capture raises.
"""
from __future__ import annotations

import logging

import torch

from vidrt.core.schedulers import FlowEuler

log = logging.getLogger("vidrt")


def unsupported(pipe, latents: torch.Tensor, solver) -> str | None:
    """Why the step cannot be graphed here, or None."""
    if latents.device.type != "cuda":
        return "CUDA graphs need a CUDA device (running on " + latents.device.type + ")"
    if pipe.backend not in ("torch", "tensorrt"):
        return f"the {pipe.backend} DiT part cannot be captured (onnxruntime runs its own CUDA graphs)"
    if not isinstance(solver, FlowEuler):
        return f"solver {solver.name} keeps its multistep history on the host; only euler is graphed"
    if pipe.family.expert_boundary is not None:
        return "two experts (Wan 2.2 A14B) are chosen per step on the host; one graph would hold one expert"
    return None


class GraphedStep:
    """Static buffers + one captured step for one (latent shape, text shape, CFG) combination."""

    def __init__(self, dit, latents: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, warmup: int = 2):
        self.dit, self.cfg_on = dit, text.shape[0] == 2 * latents.shape[0]
        self.x, self.text, self.mask = latents.clone(), text.clone(), mask.clone()
        self.t = torch.zeros(text.shape[0], device=latents.device, dtype=torch.float32)
        self.dt = torch.zeros((), device=latents.device, dtype=torch.float32)
        self.g = torch.zeros((), device=latents.device, dtype=torch.float32)
        with torch.cuda.device(latents.device):  # capture on the latents' GPU, not the current one
            side = torch.cuda.Stream(latents.device)
            side.wait_stream(torch.cuda.current_stream(latents.device))
            x0 = self.x.clone()
            # warm-up: allocator, cuBLAS handles, and the TensorRT context of this shape, which the capture then uses
            with torch.cuda.stream(side), torch.no_grad():
                for _ in range(warmup):
                    self._step()
            torch.cuda.current_stream(latents.device).wait_stream(side)
            self.x.copy_(x0)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph), torch.no_grad():
                self._step()
            self.x.copy_(x0)  # capture ran the step once on x0

    def _step(self):
        xin = torch.cat([self.x, self.x]) if self.cfg_on else self.x
        v = self.dit(xin, self.t, self.text, self.mask).to(torch.float32)
        if self.cfg_on:
            v_u, v_c = v.chunk(2)
            v = v_u + self.g * (v_c - v_u)
        self.x.copy_((self.x.float() + self.dt * v).to(self.x.dtype))

    def start(self, latents, text, mask, guidance: float) -> "GraphedStep":
        self.x.copy_(latents)
        self.text.copy_(text)
        self.mask.copy_(mask)
        self.g.fill_(guidance)
        return self

    def step(self, t: float, t_next: float, model_t: float | None = None, guidance: float | None = None):
        """One replay from noise level t to t_next, the DiT given `model_t` (default t: a family's scheduler may
        count in other units, Wan's 0..1000), guided by `guidance` (default: start's); returns the static latents
        buffer (valid until the next step)."""
        self.t.fill_(t if model_t is None else model_t)
        if guidance is not None:
            self.g.fill_(guidance)
        self.dt.fill_(t_next - t)
        with torch.cuda.device(self.x.device):
            self.graph.replay()
        return self.x


def graphed_step(pipe, latents, text, mask, guidance: float, solver) -> GraphedStep | None:
    """The captured step for this call's shapes, primed with its inputs, or None (reason logged, kept in
    pipe.graph_fallback) when it cannot run."""
    reason = unsupported(pipe, latents, solver)
    if reason is None:
        # a swapped DiT (e.g. quality_report's) must capture anew, never replay the old one
        key = (id(pipe.dit), tuple(latents.shape), latents.dtype, tuple(text.shape), text.dtype)
        cache = pipe.__dict__.setdefault("_graphs", {})
        try:
            if key not in cache:
                cache[key] = GraphedStep(pipe.dit, latents, text, mask)
        except RuntimeError as e:  # CUDA capture errors are RuntimeErrors
            reason = f"capture failed: {str(e).splitlines()[0]}"
        else:
            pipe.graph_fallback = None
            return cache[key].start(latents, text, mask, guidance)
    pipe.graph_fallback = reason
    log.warning("vidrt: CUDA graphs off for this call: %s; running the step eagerly", reason)
    return None
