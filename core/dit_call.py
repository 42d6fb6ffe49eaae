"""The runtime's one DiT call, dit(latents, timestep, text, text_mask) -> velocity, on graphs and engines: a graph
that declares fewer inputs (DitCall), several parts switched by timestep (RoutedDit)."""
from __future__ import annotations

from typing import Callable

import torch

DIT_CALL = ("latents", "timestep", "text", "text_mask")  # the runtime's one DiT call, in this order
DitFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RoutedDit:
    """Several DiT parts behind one DiT call (Wan 2.2 A14B's experts): each step runs the first part whose timestep
    predicate (a PartSpec's calib_select) accepts the step's timestep; None accepts every one."""

    def __init__(self, parts: list):
        self.parts = parts  # [(predicate on a (1,) timestep tensor, or None; DitCall)]
        self.backend = parts[0][1].backend

    def __call__(self, latents, timestep, *rest):
        t = timestep.reshape(-1)[:1]
        part = next(p for sel, p in self.parts if sel is None or bool(sel(t)[0]))
        return part(latents, timestep, *rest)


class DitCall:
    """The runtime's DiT call (DIT_CALL order) on a graph that declares fewer inputs (Wan has no text mask)."""

    def __init__(self, part, inputs: tuple[str, ...]):
        self.part, self.inputs, self.name, self.backend = part, tuple(inputs), part.name, part.backend  # a Part

    def __call__(self, *args):
        named = dict(zip(DIT_CALL, args))
        return self.part(*(named[n] for n in self.inputs))
