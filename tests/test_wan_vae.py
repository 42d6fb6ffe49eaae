"""Streaming Wan VAE decode (families/wan/vae_export.py) against diffusers' AutoencoderKLWan.decode, tiny random VAE."""
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vidrt.families.wan.family import WanFamily  # noqa: E402
from vidrt.families.wan.tiny import save_wan  # noqa: E402
from vidrt.families.wan.vae_export import (OrtStep, WanDecodeStep, cache_shapes, export_decode_step,
                                           nearest_for_export, stream_decode)

H, W = 4, 6  # export latent shape


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    root = save_wan(tmp_path_factory.mktemp("wan") / "tiny")
    return WanFamily.from_dir(root).vae.float().eval()


@pytest.fixture(scope="module")
def graphs(vae, tmp_path_factory):
    return export_decode_step(vae, tmp_path_factory.mktemp("onnx"), batch=1, h=H, w=W)


def _latents(vae, b, t, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, vae.config.z_dim, t, h, w, generator=g) * 2


def _ref(vae, z):
    with torch.no_grad():
        return vae.decode(z).sample


@pytest.mark.parametrize("t", [1, 2, 3])
def test_torch_stream_equals_diffusers(vae, t):
    z = _latents(vae, 2, t, H, W, seed=t)
    ref = _ref(vae, z)
    out = stream_decode(WanDecodeStep(vae, True), WanDecodeStep(vae, False), z)
    assert out.shape == ref.shape == (2, 3, 1 + 4 * (t - 1), 8 * H, 8 * W)
    d = (out - ref).abs().max().item()
    print(f"torch stream vs diffusers, T={t}: max abs {d:.2e}")
    assert d <= 1e-5


def test_cache_shapes(vae):
    shapes = cache_shapes(vae, 3, H, W)
    _, *cache = WanDecodeStep(vae, True)(_latents(vae, 3, 1, H, W))
    assert shapes == [tuple(c.shape) for c in cache]
    assert all(s[2] == 2 for s in shapes)


def test_nearest_exact_equals_nearest_for_factor_2():
    g = torch.Generator().manual_seed(0)
    for shape in [(1, 2, 1, 1), (2, 3, 5, 7), (1, 4, 16, 9), (1, 1, 33, 2)]:
        x = torch.randn(shape, generator=g)
        a = F.interpolate(x, scale_factor=(2.0, 2.0), mode="nearest-exact")
        b = F.interpolate(x, scale_factor=(2.0, 2.0), mode="nearest")
        assert torch.equal(a, b)


def test_swap_is_exact_and_restored(vae):
    z = _latents(vae, 1, 3, H, W)
    ref = stream_decode(WanDecodeStep(vae, True), WanDecodeStep(vae, False), z)
    with nearest_for_export(vae):
        modes = {m.mode for m in vae.modules() if isinstance(m, torch.nn.Upsample)}
        out = stream_decode(WanDecodeStep(vae, True), WanDecodeStep(vae, False), z)
    assert modes == {"nearest"}
    assert {m.mode for m in vae.modules() if isinstance(m, torch.nn.Upsample)} == {"nearest-exact"}
    assert torch.equal(out, ref)


@pytest.mark.parametrize("b,t,h,w", [(1, 3, H, W), (2, 2, 6, 4)])
def test_onnx_stream_equals_diffusers(vae, graphs, b, t, h, w):
    z = _latents(vae, b, t, h, w, seed=10 + t)
    ref = _ref(vae, z)
    out = stream_decode(OrtStep(graphs["first"]), OrtStep(graphs["step"]), z)
    assert out.shape == ref.shape
    d = (out - ref).abs().max().item()
    print(f"onnxruntime stream vs diffusers, {b}x{t}x{h}x{w}: max abs {d:.2e}")
    assert d <= 1e-4


def test_cache_carries_the_past(vae):
    """The test above is discriminative: steady steps fed zero caches (no past) do not reproduce diffusers."""
    z = _latents(vae, 1, 3, H, W, seed=3)
    ref = _ref(vae, z)
    assert 0 < (ref.abs() < 1).float().mean()  # not everything clamped
    first, step = WanDecodeStep(vae, True), WanDecodeStep(vae, False)
    with torch.no_grad():
        _, *cache = first(z[:, :, :1])
        _, *warm = step(z[:, :, 1:2], *cache)
        cold = step(z[:, :, 2:3], *[torch.zeros_like(c) for c in cache])[0]
        good = step(z[:, :, 2:3], *warm)[0]
    assert torch.equal(good, ref[:, :, 5:9])
    assert (cold - ref[:, :, 5:9]).abs().max() > 1e-3


@pytest.fixture(scope="module")
def vae22():
    """A tiny Wan 2.2-style VAE (residual up blocks with the first-chunk shortcut, patch_size 2)."""
    import diffusers
    torch.manual_seed(0)
    return diffusers.AutoencoderKLWan(
        base_dim=4, decoder_base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
        temperal_downsample=[False, True, True], is_residual=True, patch_size=2, in_channels=12, out_channels=12,
        scale_factor_spatial=16, latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()


def test_wan22_residual_vae(vae22, tmp_path):
    z = torch.randn(2, 4, 3, 3, 5, generator=torch.Generator().manual_seed(1))
    ref = _ref(vae22, z)
    out = stream_decode(WanDecodeStep(vae22, True), WanDecodeStep(vae22, False), z)
    assert out.shape == ref.shape == (2, 3, 9, 48, 80)
    d = (out - ref).abs().max().item()
    g = export_decode_step(vae22, tmp_path, batch=1, h=3, w=5)
    z2 = torch.randn(1, 4, 2, 4, 2, generator=torch.Generator().manual_seed(2))
    d2 = (stream_decode(OrtStep(g["first"]), OrtStep(g["step"]), z2) - _ref(vae22, z2)).abs().max().item()
    print(f"Wan 2.2-style VAE: torch stream {d:.2e}, onnxruntime at another shape {d2:.2e}")
    assert d <= 1e-5 and d2 <= 1e-4
