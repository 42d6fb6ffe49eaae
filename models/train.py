"""Train the tiny model (causal VAE, then DiT) on the synthetic text-to-video world, on CPU.

    vidrt train --out runs/tiny            # what produced models/weights/tiny
Stage 1 trains the VAE on freshly rendered clips; stage 2 encodes a fixed clip set to latents and trains the DiT with
the rectified-flow objective (velocity = noise - x0), 10% empty-prompt dropout for classifier-free guidance.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from vidrt.models.checkpoint import _load_into, save_checkpoint
from vidrt.models.config import ModelConfig, preset
from vidrt.models.dit import VideoDiT
from vidrt.models.synthetic import Scene, render, split_scenes, to_tensor_range
from vidrt.models.text import TextEncoder
from vidrt.models.vae import CausalVAE


def render_batch(scenes: list[Scene], cfg: ModelConfig, rng: np.random.Generator) -> torch.Tensor:
    s = cfg.sample
    return torch.from_numpy(np.stack([to_tensor_range(render(sc, s.num_frames, s.height, rng)) for sc in scenes]))


def _cosine_lr(opt, step, steps, lr, warmup=50):
    f = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
    for g in opt.param_groups:
        g["lr"] = lr * max(f, 0.02)


def object_weights(x: torch.Tensor, object_weight: float) -> torch.Tensor:
    """Per-pixel loss weight 1 + object_weight on pixels that differ from the clip's background (the per-channel
    median of frame 0): the object is ~11% of the pixels and its colour is what the prompt is about."""
    bg = x[:, :, :1].flatten(2).median(dim=2).values[:, :, None, None, None]
    return 1.0 + object_weight * ((x - bg).abs().sum(1, keepdim=True) > 0.1).float()


def train_vae(cfg: ModelConfig, scenes: list[Scene], steps: int, batch: int = 16, lr: float = 2e-3,
              kl_weight: float = 1e-6, object_weight: float = 0.0, seed: int = 0,
              vae: CausalVAE | None = None) -> CausalVAE:
    """Train (or, given `vae`, fine-tune) the VAE on freshly rendered clips."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae = vae.train() if vae is not None else CausalVAE(cfg.vae)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    bar = tqdm(range(steps), desc="vae", mininterval=5)
    for step in bar:
        x = render_batch([scenes[i] for i in rng.integers(len(scenes), size=batch)], cfg, rng)
        mean, logvar = vae.encode_stats(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        rec = vae.decode(z)
        err = rec - x
        mse = err.pow(2).mean()
        w = object_weights(x, object_weight) if object_weight else 1.0
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        loss = (w * err.pow(2)).mean() + 0.1 * (w * err.abs()).mean() + kl_weight * kl
        _cosine_lr(opt, step, steps, lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        bar.set_postfix(mse=f"{mse.item():.5f}", kl=f"{kl.item():.2f}", refresh=False)
    return vae.eval()


@torch.no_grad()
def encode_clips(vae: CausalVAE, cfg: ModelConfig, scenes: list[Scene], per_scene: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    lat, idx = [], []
    for i, sc in enumerate(tqdm(scenes, desc="encode", mininterval=5)):
        lat.append(vae.encode(render_batch([sc] * per_scene, cfg, rng)))
        idx += [i] * per_scene
    return torch.cat(lat), torch.tensor(idx)


def train_dit(cfg: ModelConfig, latents: torch.Tensor, scene_idx: torch.Tensor, text: torch.Tensor,
              mask: torch.Tensor, null_text: torch.Tensor, null_mask: torch.Tensor, steps: int, batch: int = 64,
              lr: float = 5e-4, p_uncond: float = 0.1, seed: int = 0) -> VideoDiT:
    """latents are already normalised; text/mask are per scene; null_* is the empty prompt (1, L, D)."""
    torch.manual_seed(seed)
    dit = VideoDiT(cfg.dit)
    opt = torch.optim.AdamW(dit.parameters(), lr=lr, weight_decay=0.01)
    ema = {k: v.detach().clone() for k, v in dit.state_dict().items()}
    bar = tqdm(range(steps), desc="dit", mininterval=5)
    for step in bar:
        j = torch.randint(len(latents), (batch,))
        x0 = latents[j]
        ctx, m = text[scene_idx[j]].clone(), mask[scene_idx[j]].clone()
        drop = torch.rand(batch) < p_uncond
        ctx[drop], m[drop] = null_text[0], null_mask[0]
        t = torch.sigmoid(torch.randn(batch))  # logit-normal timesteps
        noise = torch.randn_like(x0)
        tt = t[:, None, None, None, None]
        v = dit((1 - tt) * x0 + tt * noise, t, ctx, m)
        loss = F.mse_loss(v, noise - x0)
        _cosine_lr(opt, step, steps, lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for k, p in dit.state_dict().items():
                ema[k].mul_(decay).add_(p, alpha=1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    dit.load_state_dict(ema)
    return dit.eval()


def train_tiny(out: str | Path, vae_steps: int = 1000, vae_finetune_steps: int = 500, dit_steps: int = 2500,
               clips_per_scene: int = 32, seed: int = 0, vae_dir: str | Path | None = None) -> Path:
    """Full recipe; returns the checkpoint directory. Stage 1a: VAE with a plain reconstruction loss; 1b: fine-tune
    with object pixels weighted x10 (colour fidelity of small objects); 2: DiT. `vae_dir` starts from that
    checkpoint's VAE and runs only stage 1b (if vae_finetune_steps > 0) and stage 2."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = preset("tiny")
    train_scenes, _ = split_scenes()
    t0 = time.time()
    if vae_dir is not None:
        vae = CausalVAE(cfg.vae)
        _load_into(vae, Path(vae_dir) / "vae.safetensors")
    else:
        vae = train_vae(cfg, train_scenes, vae_steps, seed=seed)
        save_checkpoint(Path(out) / "vae_only", cfg, VideoDiT(cfg.dit), vae)
    if vae_finetune_steps:
        vae = train_vae(cfg, train_scenes, vae_finetune_steps, lr=5e-4, object_weight=9.0, seed=seed + 2, vae=vae)
        save_checkpoint(Path(out) / "vae_finetuned", cfg, VideoDiT(cfg.dit), vae)
    vae.eval()
    latents, idx = encode_clips(vae, cfg, train_scenes, clips_per_scene, seed=seed + 1)
    cfg.vae.latent_mean, cfg.vae.latent_std = float(latents.mean()), float(latents.std())
    latents = (latents - cfg.vae.latent_mean) / cfg.vae.latent_std
    te = TextEncoder(cfg.text)
    text, mask = te.encode([s.prompt for s in train_scenes])
    null_text, null_mask = te.encode([""])
    dit = train_dit(cfg, latents, idx, text, mask, null_text, null_mask, dit_steps, seed=seed)
    path = save_checkpoint(out, cfg, dit, vae)
    print(f"trained tiny model in {time.time() - t0:.0f}s -> {path}")
    return path
