"""The VAE decoder's 2-D form (models/vae.py conv_frames / Decoder.forward_2d), its ONNX graph, and the INT8 decoder
graph for onnxruntime's CPU (export/onnx_export.quantize_vae_decoder)."""
import numpy as np
import onnx
import pytest
import torch

from vidrt.core.ort import ort_session
from vidrt.export import onnx_export as ox
from vidrt.families.vidrt import export as vx
from vidrt.families.registry import load_family
from vidrt.models.config import preset
from vidrt.models.vae import CausalConv3d, CausalVAE, Upsample, conv_frames, time_taps


@pytest.mark.parametrize("kernel", [(3, 3, 3), (3, 1, 1), (1, 3, 3), (1, 1, 1), (2, 3, 3)])
@pytest.mark.parametrize("B,T,H,W", [(1, 1, 4, 4), (2, 5, 7, 3), (1, 9, 5, 6)])
def test_conv_frames_equals_causal_conv3d(kernel, B, T, H, W):
    torch.manual_seed(0)
    m = CausalConv3d(6, 5, kernel)
    x = torch.randn(B, 6, T, H, W)
    with torch.no_grad():
        ref = m(x)  # (B, 5, T, H, W)
        out = conv_frames(m.conv, x.transpose(1, 2).flatten(0, 1), T).unflatten(0, (B, T)).transpose(1, 2)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 1e-5


def test_conv_frames_refuses_strided_convs():
    with pytest.raises(ValueError, match="stride-1"):
        conv_frames(CausalConv3d(4, 4, (3, 1, 1), stride=(2, 1, 1)).conv, torch.randn(3, 4, 2, 2), 3)


@pytest.mark.parametrize("shape", [(1, 1, 4, 4), (2, 2, 3, 5), (1, 4, 2, 6), (1, 5, 8, 8)])
def test_forward_2d_is_the_decoder(shape):
    vae = load_family("tiny").vae.eval()  # the trained weights
    small = CausalVAE(preset("small").vae).eval()
    for v in (vae, small):
        z = torch.randn(shape[0], v.cfg.z_channels, *shape[1:])
        with torch.no_grad():
            assert (v.decoder.forward_2d(z) - v.decoder(z)).abs().max() <= 1e-4


@pytest.fixture(scope="module")
def tiny_graph(tmp_path_factory):
    fam = load_family("tiny")
    cfg = fam.cfg
    part = vx.DecoderPart(fam.vae, cfg.vae.latent_mean, cfg.vae.latent_std)
    path = tmp_path_factory.mktemp("vae") / "vae.onnx"
    ox.export_onnx(part, vx.vae_inputs(cfg, 1, (5, 8, 8)), vx.VAE_IO, path)
    return fam, path


def test_exported_decoder_has_only_2d_convs_and_dynamic_axes(tiny_graph):
    fam, path = tiny_graph
    model = onnx.load(str(path))
    inits = {t.name: len(t.dims) for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs and all(inits[n.input[1]] == 4 for n in convs)  # no Conv3d left
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "", "frames", "height", "width"]


@pytest.mark.parametrize("shape", [(1, 5, 8, 8), (2, 3, 3, 5), (1, 1, 4, 4), (1, 8, 2, 6)])
def test_exported_decoder_matches_the_conv3d_decoder(tiny_graph, shape):
    fam, path = tiny_graph
    cfg = fam.cfg
    z = torch.randn(shape[0], cfg.vae.z_channels, *shape[1:])
    with torch.no_grad():  # the PyTorch decoder itself (Conv3d), not the exported 2-D form
        ref = fam.vae.decoder(z * cfg.vae.latent_std + cfg.vae.latent_mean).clamp(-1, 1).numpy()
    out = ort_session(path).run(None, {"latents": z.numpy()})[0]
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= 1e-4


def test_exported_decoder_tiles_exactly(tiny_graph):
    fam, path = tiny_graph
    sess = ort_session(path)
    z = torch.randn(1, fam.cfg.vae.z_channels, 9, 4, 4)
    run = lambda t: torch.from_numpy(sess.run(None, {"latents": t.numpy()})[0])
    whole = run(z)
    for tile in (1, 2, 3):
        torch.testing.assert_close(fam.vae.decode_tiled(z, tile=tile, decode_fn=run), whole, atol=2e-5, rtol=1e-5)


def test_int8_decoder_runs_qlinearconv_and_keeps_quality(tiny_graph, tmp_path):
    import onnxruntime as ort
    fam, path = tiny_graph
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(10, fam.cfg.vae.z_channels, 3, 4, 4, generator=g).numpy()
    q = ox.quantize_vae_decoder(path, lat[:8], tmp_path / "vae.int8.onnx")
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(q), so, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert "QLinearConv" in ops and "Conv" not in ops  # every conv runs in int8
    ref, out = (ort_session(p).run(None, {"latents": lat[8:]})[0] for p in (path, q))
    psnr = 10 * np.log10(4.0 / np.mean((out - ref) ** 2))  # video in [-1, 1]
    assert psnr > 30


@pytest.mark.parametrize("N,H,W", [(1, 1, 1), (3, 4, 4), (2, 3, 7), (17, 8, 8)])
@pytest.mark.parametrize("pass_hw", [False, True])
def test_upsample_frames_equals_conv_after_nearest_upsample(N, H, W, pass_hw):
    """Upsample.frames' sub-pixel form (one 2x2 conv on the low-resolution frames + interleave) is the original
    3x3 conv after a nearest x2 upsample, to float rounding, with and without the temporal x2."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    for temporal in (False, True):
        m = Upsample(6, temporal).eval()
        T = N
        x = torch.randn(2 * T, 6, H, W)  # B = 2
        with torch.no_grad():
            y, T2 = m.frames(x, T, (H, W) if pass_hw else None)
            if temporal:  # the original form: time conv, then the spatial conv on the upsampled frames
                taps = (time_taps(2 * T - 1, m.temporal.time_pad + 1) + 1) // 2
                x = conv_frames(m.temporal.conv, x, T, taps)
            ref = conv_frames(m.spatial, F.interpolate(x, scale_factor=2.0, mode="nearest"), T2)
        assert T2 == (2 * T - 1 if temporal else T)
        assert y.shape == ref.shape == (2 * T2, 6, 2 * H, 2 * W)
        assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_exported_upsample_is_one_conv_without_resize(tiny_graph):
    """The exported upsample: a 2x2 conv at 4x the channels (weight folded into an initializer, so the INT8 graph
    quantizes it per channel), no Resize/DepthToSpace."""
    fam, path = tiny_graph
    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    assert "Resize" not in ops and "DepthToSpace" not in ops
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    kernels = [inits[n.input[1]][2:] for n in model.graph.node if n.op_type == "Conv"]
    n_up = sum(isinstance(m, Upsample) for m in fam.vae.decoder.up)
    assert kernels.count([2, 2]) == n_up > 0
