"""The Wan VAE decoder (diffusers' AutoencoderKLWan) as streaming step graphs: one latent frame in, its video out.

diffusers decodes Wan latents causally: `_decode` runs `vae.decoder` once per latent frame and threads a feature
cache through the calls (`feat_cache`, a list with one slot per cached layer, `feat_idx` the running slot index). A
graph of `vae.decoder(z)` without the cache returns the wrong number of frames, and overlapping time windows are not
exact, because the cache carries the past indefinitely. So the export unit here is one *step* of that loop, with the
cache as explicit tensors in and out, and a small driver (`stream_decode`) runs the loop outside the graph.

Two graphs, not one. The first latent frame takes a different path: every temporal upsampler ("upsample3d") skips
its time convolution and time doubling (diffusers marks its slot "Rep"), and Wan 2.2's residual shortcut drops the
leading frame (`first_chunk`), so it decodes to 1 video frame where every later latent frame decodes to 4.
The outputs have different shapes and different arithmetic, so no zero cache + flag input can make one fixed-
signature graph exact. Every *later* step, however, is exact with zero-initialised caches, so the steady graph
needs no flag:
- a causal conv with no cache pads 2 zero frames in front; a 2-frame zero cache concatenated in front is the same
  input, and the 1-frame caches the first step leaves behind behave like [0, c] (diffusers pads 1 zero frame);
- a "Rep" slot runs the time conv with zero padding and caches [0, x]; a zero cache gives exactly that.
So the first graph (`WanDecodeStep(vae, first=True)`) takes only the latent frame and *normalises* the cache it
starts: every slot becomes a 2-frame tensor (1-frame slots get a zero frame in front, "Rep" slots become zeros of
the upsampler's input shape). The steady graph (`first=False`) takes latent frame + those tensors and returns 4
frames + the updated tensors with the same shapes, so one fixed signature serves every later frame.

The step includes diffusers' post_quant_conv (a 1x1x1 conv, per frame exact), unpatchify (Wan 2.2's patch_size)
and the clamp to [-1, 1] that `AutoencoderKLWan._decode` applies to its output (element-wise, so per frame exact).
Input latents are de-normalised (latents * std + mean, as WanFamily.decode does before `vae.decode`).

Export swap: diffusers upsamples space with nn.Upsample(scale_factor=2, mode="nearest-exact"), which the TorchScript
exporter lacks (`_upsample_nearest_exact2d`). For an integer factor 2 it equals mode "nearest": nearest-exact reads
source index floor((d + 0.5) / 2) = floor(d / 2 + 1/4) and nearest floor(d / 2); d / 2 has fraction 0 or 1/2, so
adding 1/4 never crosses an integer. `nearest_for_export(vae)` swaps the mode for the duration of the export only
(tests check the op and the whole step bit for bit).
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from vidrt.core.ort import ort_session
from vidrt.export.onnx_export import GraphIO, export_onnx


def _wan_modules():
    from diffusers.models.autoencoders import autoencoder_kl_wan as m
    return m


class WanDecodeStep(nn.Module):
    """One step of diffusers' causal Wan decode, with the feature cache as explicit tensors.

    first=True:  forward(latent) -> (video, *cache)          latent (B, C, 1, h, w) -> video (B, 3, 1, H, W)
    first=False: forward(latent, *cache) -> (video, *cache)  video (B, 3, 4, H, W) (temporal factor 4)
    Every cache tensor is (B, C_i, 2, h * s_i, w * s_i); `cache_shapes` lists them.
    """

    def __init__(self, vae: nn.Module, first: bool):
        super().__init__()
        self.post_quant_conv, self.decoder, self.first = vae.post_quant_conv, vae.decoder, first
        self.patch = vae.config.patch_size
        m = _wan_modules()
        # an upper bound of the slots (as diffusers allocates: 1x1 shortcut convs count but cache nothing)
        self.max_slots = sum(isinstance(x, m.WanCausalConv3d) for x in self.decoder.modules())
        self._time_up = [x for x in self.decoder.modules() if isinstance(x, m.WanResample) and x.mode == "upsample3d"]

    def forward(self, latent: torch.Tensor, *cache: torch.Tensor):
        if self.first != (len(cache) == 0):
            raise ValueError(f"the first step takes no cache, the steady step the first step's; got {len(cache)}")
        if latent.shape[2] != 1:
            raise ValueError(f"one latent frame per step, got {latent.shape[2]}")
        feats: list = [None] * self.max_slots if self.first else list(cache)
        idx = [0]
        seen: list[torch.Tensor] = []  # inputs of the temporal upsamplers, in call order (first step only)
        ups = self._time_up if self.first else []
        hooks = [r.register_forward_pre_hook(lambda mod, args: seen.append(args[0])) for r in ups]
        try:
            x = self.decoder(self.post_quant_conv(latent), feat_cache=feats, feat_idx=idx, first_chunk=self.first)
        finally:
            for h in hooks:
                h.remove()
        if not self.first and idx[0] != len(cache):
            raise ValueError(f"the decoder used {idx[0]} cache slots but {len(cache)} tensors came in")
        feats = feats[:idx[0]]
        if self.patch is not None:
            x = _wan_modules().unpatchify(x, patch_size=self.patch)
        if self.first:
            feats = self._normalise(feats, seen)
        return (x.clamp(-1.0, 1.0), *feats)

    def _normalise(self, feats: list, seen: list[torch.Tensor]) -> list[torch.Tensor]:
        """The first step's cache as the steady step expects it: 2 frames per slot (see the module docstring)."""
        out, reps = [], iter(seen)
        for f in feats:
            if isinstance(f, str):  # "Rep": the upsampler's next call runs its time conv on zero padding
                z = torch.zeros_like(next(reps))
                out.append(torch.cat([z, z], 2))
            elif f is None:
                raise RuntimeError("a cache slot was not filled: the decoder's layout is not the one this wraps")
            elif f.shape[2] == 1:
                out.append(torch.cat([torch.zeros_like(f), f], 2))
            else:
                out.append(f)
        return out


def cache_shapes(vae: nn.Module, batch: int, h: int, w: int) -> list[tuple[int, ...]]:
    """Shapes of the cache tensors for latent frames (batch, C, 1, h, w). Measured by one first step at a 1x1 latent
    (cheap at any model size): each slot's spatial size there is its scale s_i, and it is h * s_i, w * s_i at h, w."""
    p = next(vae.parameters())
    with torch.no_grad():
        _, *cache = WanDecodeStep(vae, first=True)(torch.zeros(1, vae.config.z_dim, 1, 1, 1, device=p.device,
                                                               dtype=p.dtype))
    return [(batch, c.shape[1], c.shape[2], h * c.shape[3], w * c.shape[4]) for c in cache]


StepFn = Callable[..., Sequence[torch.Tensor]]


def stream_decode(first_fn: StepFn, step_fn: StepFn, z: torch.Tensor) -> torch.Tensor:
    """De-normalised latents (B, C, T, h, w) -> video (B, 3, 1 + 4 (T - 1), H, W) in [-1, 1], as diffusers'
    `vae.decode(z).sample`. first_fn/step_fn: the two WanDecodeStep modules or their onnxruntime graphs (OrtStep)."""
    with torch.no_grad():
        video, *cache = first_fn(z[:, :, :1])
        out = [video]
        for i in range(1, z.shape[2]):
            video, *cache = step_fn(z[:, :, i:i + 1], *cache)
            out.append(video)
    return torch.cat(out, 2)


class OrtStep:
    """An exported step graph behind the WanDecodeStep call signature (torch tensors in and out, CPU)."""

    def __init__(self, path: str | Path, **session_kw):
        self.sess = ort_session(str(path), **session_kw)
        self.names = [i.name for i in self.sess.get_inputs()]

    def __call__(self, latent: torch.Tensor, *cache: torch.Tensor) -> list[torch.Tensor]:
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(self.names, (latent, *cache), strict=True)}
        return [torch.from_numpy(o) for o in self.sess.run(None, feeds)]


@contextmanager
def nearest_for_export(vae: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every 2x 'nearest-exact' upsampler of the VAE uses mode 'nearest' (exact for factor 2, see
    the module docstring); restored on exit."""
    swapped = []
    for m in vae.modules():
        if isinstance(m, nn.Upsample) and m.mode == "nearest-exact":
            sf = m.scale_factor if isinstance(m.scale_factor, tuple) else (m.scale_factor,)
            if m.size is not None or any(float(s) != 2.0 for s in sf):
                raise ValueError(f"nearest-exact equals nearest only for factor 2, not {m.scale_factor}")
            m.mode = "nearest"
            swapped.append(m)
    try:
        yield vae
    finally:
        for m in swapped:
            m.mode = "nearest-exact"


def step_io(n_cache: int, scales: list[tuple[int, int]], first: bool, dynamic: bool = True) -> GraphIO:
    """The IO of a step graph. Dynamic: batch, and latent height/width, which
    every cache and the video follow (cache i's height is latent height x its scale; ONNX names a dim per scale)."""
    cin, cout = [f"cache_{i}" for i in range(n_cache)], [f"cache_out_{i}" for i in range(n_cache)]
    names, outs = ["latent"] + ([] if first else cin), ["video"] + cout
    axes: dict = {}
    if dynamic:
        axes = {"latent": {0: "batch", 3: "height", 4: "width"}, "video": {0: "batch", 3: "video_height",
                                                                            4: "video_width"}}
        for i, (sh, sw) in enumerate(scales):
            dims = {0: "batch", 3: f"height_x{sh}", 4: f"width_x{sw}"}
            axes[cout[i]] = dims
            if not first:
                axes[cin[i]] = dims
    return GraphIO(names, outs, axes)


def export_decode_step(vae: nn.Module, out_dir: str | Path, batch: int = 1, h: int = 8, w: int = 8,
                       dynamic: bool = True) -> dict[str, Path]:
    """Export the two step graphs to out_dir/wan_vae_first.onnx and out_dir/wan_vae_step.onnx (TorchScript exporter,
    opset 18, via export_onnx) at latent frames (batch, C, 1, h, w); with `dynamic`, batch and height/width are
    dynamic, channels and the time sizes (1 latent frame, 2 cache frames, 1 / 4 video frames) are fixed."""
    out_dir, vae = Path(out_dir), vae.eval()
    p = next(vae.parameters())
    shapes = cache_shapes(vae, batch, h, w)
    scales = [(s[3] // h, s[4] // w) for s in shapes]
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(batch, vae.config.z_dim, 1, h, w, generator=g).to(p.device, p.dtype)
    cache = [torch.randn(s, generator=g).to(p.device, p.dtype) for s in shapes]
    paths = {}
    with nearest_for_export(vae):
        for first, name in ((True, "first"), (False, "step")):
            step = WanDecodeStep(vae, first)
            io = step_io(len(shapes), scales, first, dynamic)
            inputs = dict(zip(io[0], [latent] + ([] if first else cache)))
            paths[name] = export_onnx(step, inputs, io, out_dir / f"wan_vae_{name}.onnx")
    return paths
