"""Reference text-to-video pipeline in PyTorch (diffusers-shaped call)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vidrt.models.checkpoint import load_model
from vidrt.models.config import ConfigError, ModelConfig
from vidrt.models.text import TextEncoder

from .schedulers import make_solver
from .video import save_video


@dataclass
class VideoOutput:
    frames: list[np.ndarray]  # one uint8 (T, H, W, 3) array per prompt
    fps: int

    def save(self, path: str | Path, index: int = 0, scale: int = 1) -> Path:
        return save_video(self.frames[index], path, fps=self.fps, scale=scale)


class Pipeline:
    """`Pipeline("tiny")(prompt, ...)` -> VideoOutput. Not thread-safe: use one Pipeline per thread."""

    def __init__(self, model: str | Path = "tiny", device: str = "cpu", dtype: torch.dtype = torch.float32,
                 text_encoder: TextEncoder | None = None):
        self.cfg, self.dit, self.vae = load_model(model)
        self.device, self.dtype = torch.device(device), dtype
        self.dit.to(self.device, dtype)
        self.vae.to(self.device, dtype)
        self._text_encoder = text_encoder

    @property
    def config(self) -> ModelConfig:
        return self.cfg

    @property
    def text_encoder(self) -> TextEncoder:
        if self._text_encoder is None:
            self._text_encoder = TextEncoder(self.cfg.text, device=self.device)
        return self._text_encoder

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        emb, mask = self.text_encoder.encode(prompts)
        return emb.to(self.device, self.dtype), mask.to(self.device)

    @torch.no_grad()
    def denoise(self, latents: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, guidance_scale: float,
                solver, progress: bool = True) -> torch.Tensor:
        """Run the sampling loop. With CFG, text/mask hold [uncond; cond] (2B rows) and the DiT runs as one batch."""
        cfg_on = text.shape[0] == 2 * latents.shape[0]
        solver.reset()
        x = latents
        steps = len(solver.timesteps) - 1
        for i in tqdm(range(steps), desc="denoise", disable=not progress, leave=False):
            xin = torch.cat([x, x]) if cfg_on else x
            t = torch.full((xin.shape[0],), solver.timesteps[i], device=x.device, dtype=torch.float32)
            v = self.dit(xin, t, text, mask).to(torch.float32)
            if cfg_on:
                v_u, v_c = v.chunk(2)
                v = v_u + guidance_scale * (v_c - v_u)
            x = solver.step(i, x, v).to(latents.dtype)
        return x

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tile: int = 4) -> list[np.ndarray]:
        z = latents * self.cfg.vae.latent_std + self.cfg.vae.latent_mean
        video = self.vae.decode_tiled(z.to(self.dtype), tile=tile).float().clamp(-1, 1)
        u8 = ((video + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()
        return list(u8)

    def sample_latents(self, prompt: str | list[str], negative_prompt: str | list[str] = "",
                       num_frames: int | None = None, height: int | None = None, width: int | None = None,
                       num_inference_steps: int | None = None, guidance_scale: float | None = None, seed: int = 0,
                       solver: str = "euler", shift: float | None = None, progress: bool = True) -> torch.Tensor:
        """Validate the request and run the sampling loop; returns normalised latents (B, C, T, H, W)."""
        s = self.cfg.sample
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise ConfigError("prompt is empty: describe the video, e.g. 'a red circle moving left on a blue "
                              "background'")
        negs = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negs) != len(prompts):
            raise ConfigError(f"{len(negs)} negative prompts for {len(prompts)} prompts: give one or one per prompt")
        num_frames, height, width = num_frames or s.num_frames, height or s.height, width or s.width
        steps = num_inference_steps or s.num_inference_steps
        g = s.guidance_scale if guidance_scale is None else guidance_scale
        shape = self.cfg.latent_shape(num_frames, height, width)  # validates, naming the fix
        sched = make_solver(solver, steps, s.shift if shift is None else shift)

        gen = torch.Generator().manual_seed(seed)  # noise drawn on CPU: same video on every device
        latents = torch.randn((len(prompts), *shape), generator=gen).to(self.device, self.dtype)
        text, mask = self.encode_prompts(negs + prompts if g > 1.0 else prompts)
        return self.denoise(latents, text, mask, g, sched, progress)

    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] = "", num_frames: int | None = None,
                 height: int | None = None, width: int | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, seed: int = 0, solver: str = "euler",
                 shift: float | None = None, decode_tile: int = 4, progress: bool = True) -> VideoOutput:
        latents = self.sample_latents(prompt, negative_prompt, num_frames, height, width, num_inference_steps,
                                      guidance_scale, seed, solver, shift, progress)
        return VideoOutput(self.decode(latents, tile=decode_tile), fps=self.cfg.sample.fps)
