"""A generation request with every default resolved and validated (runtime/pipeline.Pipeline.request makes one);
families read it to estimate memory."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Request:
    """A validated generation request with every default resolved (Pipeline.request)."""
    prompts: list[str]
    negative_prompts: list[str]
    num_frames: int
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    solver: str  # one of the family's solvers ("default" for a diffusers family: its shipped scheduler)
    shift: float
    decode_tile: int | None = None  # None: the pipeline's own
    guidance_scale_2: float | None = None  # two-expert models (Wan 2.2 A14B): the low-noise expert's; None: the same

    @property
    def dit_batch(self) -> int:
        """DiT rows per step: one per prompt, two with classifier-free guidance."""
        return len(self.prompts) * (2 if self.guidance_scale > 1 else 1)
