"""Block-streamed DiT export (export/streamed.py, export-engines --stream-blocks) on tiny Wan directories: the
assembled graph is the whole module's export (same layers, same names, same outputs), at most one block's weights
are ever read in, and the validation and memory plan take the streamed path."""
import shutil

import numpy as np
import onnx
import pytest

pytest.importorskip("diffusers")

from vidrt.core.buckets import Bucket  # noqa: E402
from vidrt.core.errors import ConfigError  # noqa: E402
from vidrt.families.ltx.tiny import save_ltx
from vidrt.families.wan.tiny import save_wan  # noqa: E402

BUCKETS = [Bucket(9, 32, 32), Bucket(5, 32, 64)]  # sides multiples of 32: valid for TI2V (x16 VAE) too


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_stream")
    out = {k: save_wan(root / k, two_experts=k == "experts", ti2v=k == "ti2v") for k in ("t2v", "ti2v", "experts")}
    # the same t2v weights in shards (an index and several files), as big checkpoints are saved
    import diffusers
    shutil.copytree(out["t2v"], root / "sharded")
    shutil.rmtree(root / "sharded" / "transformer")
    diffusers.WanTransformer3DModel.from_pretrained(out["t2v"] / "transformer").save_pretrained(
        root / "sharded" / "transformer", max_shard_size="20KB")
    out["sharded"] = root / "sharded"
    return out


def _dit_spec(d, stream: bool):
    from vidrt.families.wan.family import WanFamily
    fam = WanFamily.from_dir(d, stream_dit=stream)
    return fam, fam.export_parts(("dit",), BUCKETS, 2, 4)[0]


@pytest.mark.parametrize("kind", ["t2v", "ti2v", "sharded"])
def test_streamed_graph_is_the_whole_export(dirs, kind, tmp_path):
    """Streamed and whole exports of the same DiT: torch's outputs equal bit for bit (the same code runs), onnxruntime's
    outputs of the two graphs agree to 1e-6 (measured: identical), and the layers the quantizer sees (MatMul, Gemm,
    Conv) carry the same names, so a recipe's skip patterns and statistics apply to either. ti2v: the timestep
    embedding has a token axis inside the blocks (dynamic there)."""
    from vidrt.core.onnx_files import data_files
    from vidrt.export import onnx_export as ox
    from vidrt.export.streamed import export_streamed
    _, whole = _dit_spec(dirs["t2v" if kind == "sharded" else kind], stream=False)
    fam, spec = _dit_spec(dirs[kind], stream=True)
    assert all(p.is_meta for n, p in fam.dit.named_parameters() if ".blocks." in n)
    assert not any(p.is_meta for n, p in fam.dit.named_parameters() if ".blocks." not in n)
    with whole.swaps(whole.module):
        ox.export_onnx(whole.module, whole.example, whole.io, tmp_path / "whole.onnx")
    path, ref, rep = export_streamed(spec, spec.stream, tmp_path / "s.onnx", spec.cases, threshold=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.onnx", "s.onnx.data", "whole.onnx"]  # nothing stray
    assert data_files(path) == ["s.onnx.data"]
    torch_whole = ox.reference(whole.module, whole.cases)
    for a, b in zip(ref.outputs, torch_whole.outputs):
        assert np.array_equal(a[0], b[0])
    s, w = ox.ort_session(path), ox.ort_session(tmp_path / "whole.onnx")
    for case in spec.cases:  # both buckets at batch 1 and 2, and the probe shape (batch 3, shorter text)
        feed = {k: v.numpy() for k, v in case.items()}
        assert np.abs(s.run(None, feed)[0] - w.run(None, feed)[0]).max() <= 1e-6
    layers = lambda m: {n.name for n in m.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")}
    ms, mw = (onnx.load(str(p), load_external_data=False) for p in (path, tmp_path / "whole.onnx"))
    assert layers(ms) == layers(mw) and len(layers(ms)) > 20
    assert rep.blocks == 2 and max(rep.block_rel_l2) <= 1e-6 and max(p.rel_l2 for p in rep.skeleton_parity) <= 1e-6
    assert all(p.is_meta for n, p in fam.dit.named_parameters() if ".blocks." in n)  # every block freed again


def test_one_block_is_read_at_a_time(dirs, tmp_path, monkeypatch):
    """Whenever a block's weights are read, every other block of the skeleton is still (or again) on the meta
    device: the export never holds two blocks."""
    from vidrt.export.streamed import export_streamed
    from vidrt.models.diffusers_io import SafetensorsFolder
    fam, spec = _dit_spec(dirs["t2v"], stream=True)
    blocks, real_then = fam.dit.transformer.blocks, []
    load = SafetensorsFolder.load_into

    def spy(self, module, prefix, dtype, strict=True):
        real_then.append(sum(not next(b.parameters()).is_meta for b in blocks))
        return load(self, module, prefix, dtype, strict)
    monkeypatch.setattr(SafetensorsFolder, "load_into", spy)
    export_streamed(spec, spec.stream, tmp_path / "s.onnx", spec.cases)
    assert real_then == [0, 0]


def test_export_engines_streams_fp32_fp16_int8_fp8(dirs, tmp_path):
    """--stream-blocks through export-engines: fp32 and fp16 graphs validated whole where they fit (rel L2 measured
    2.4e-7 and 6.4e-3, bounds 1e-4 / 1e-2, as every fp16 export's), int8/fp8 calibrated on the streamed fp32 graph
    with the fp32 graph as the quality report's reference: held-out rel L2 int8 0.0032, fp8 0.0113 (bounds 0.03 /
    0.05, as the whole export's test), video PSNR int8 51.8 dB, fp8 45.7 dB (bound 35)."""
    from vidrt.builder.engines import export_engines
    from vidrt.calibration.capture import capture
    from vidrt.runtime.pipeline import Pipeline
    d = dirs["t2v"]
    man = export_engines(str(d), tmp_path / "f", ["fp32", "fp16"], BUCKETS, progress=False, parts=("dit",),
                         stream_blocks=True)
    assert man["export_memory"]["streamed"] and man["export_memory"]["whole_graph_checked"]
    assert man["validation"]["dit.fp32"]["polygraphy"]["passed"]
    assert max(p["rel_l2"] for p in man["validation"]["dit.fp32"]["parity"]) <= 1e-4
    assert max(p["rel_l2"] for p in man["validation"]["dit.fp16"]["parity"]) <= 1e-2
    assert man["streamed"]["dit.fp32"]["blocks"] == 2
    fp16 = export_engines(str(d), tmp_path / "h", ["fp16"], BUCKETS, progress=False, parts=("dit",),
                          stream_blocks=True)  # the fp32 graph gave the references only: not left in the bundle
    assert sorted(fp16["files"]) == ["dit.fp16.onnx"] and fp16["validation"]["dit.fp16"]["passed"]
    F, H, W = 9, 32, 32
    capture(Pipeline(d), ["a red circle moving left", "a blue square moving up slowly", "a green circle moving right"],
            tmp_path / "cal", F, H, W, num_inference_steps=8, progress=False)
    man = export_engines(str(d), tmp_path / "q", ["int8", "fp8"], [Bucket(F, H, W)], calib=tmp_path / "cal",
                         progress=False, parts=("dit",), stream_blocks=True)
    for prec, bound in (("int8", 0.03), ("fp8", 0.05)):
        rep = man["validation"][f"dit.{prec}"]
        assert rep["passed"] and rep["layers"].endswith("7 kept in float")
        assert max(p["rel_l2"] for p in rep["parity"]) < bound
        assert rep["tensorrt_graph"]["passed"] and man["quality"][f"dit.{prec}"]["psnr_mean"] > 35
    # the streamed fp32 graph and the 16-bit base were the quantizer's inputs only
    assert sorted(man["files"]) == ["dit.fp8.fp16.onnx", "dit.fp8.onnx", "dit.int8.fp16.onnx", "dit.int8.onnx"]


def test_too_big_to_run_whole_is_checked_block_by_block(dirs, tmp_path, monkeypatch):
    """When the assembled graph does not fit the memory limit (here: onnxruntime's cost per DiT byte raised), fp32
    and fp16 pass on their blocks' and skeleton's parity against torch in the same type (measured: fp32 blocks
    9e-8; fp16 blocks 4.2e-4, skeleton 6.5e-4, tolerance 1e-2), and int8/fp8 (which run the whole graph) are
    refused; both experts of a Wan 2.2 A14B layout stream."""
    from vidrt.builder.cli import summary_table
    from vidrt.builder.engines import export_engines
    from vidrt.export import streamed
    monkeypatch.setattr(streamed, "ORT_PER_DIT_BYTE", 1e6)
    man = export_engines(str(dirs["experts"]), tmp_path / "b", ["fp32", "fp16"], BUCKETS, progress=False,
                         parts=("dit",), stream_blocks=True)
    assert not man["export_memory"]["whole_graph_checked"]
    assert sorted(man["streamed"]) == ["dit.fp16", "dit.fp32", "dit_2.fp16", "dit_2.fp32"]
    for part in ("dit", "dit_2"):
        rep = man["validation"][f"{part}.fp32"]
        assert rep["passed"] and rep["checked"].startswith("block by block") and rep["block_rel_l2_max"] <= 1e-6
        assert len(rep["parity"]) == 5 and "polygraphy" not in rep
        rep16 = man["validation"][f"{part}.fp16"]
        assert rep16["passed"] and rep16["checked"].startswith("block by block")
    assert "ok block by block" in summary_table(man)
    gib = 2 ** 30
    with pytest.raises(ConfigError, match="int8/fp8 run the assembled DiT graph on onnxruntime.*fp32/fp16/bf16"):
        streamed.plan_stream(gib, gib, gib // 10, True, 2 * gib, "test")


def test_streaming_is_refused_where_it_cannot_apply(tmp_path):
    from vidrt.families.registry import load_family
    ltx = save_ltx(tmp_path / "ltx")
    with pytest.raises(ConfigError, match="available for wan directories, and .* is a ltx directory"):
        load_family(str(ltx), stream_dit=True)
    with pytest.raises(ConfigError, match="not a diffusers directory"):
        load_family("tiny", stream_dit=True)


def test_a_weight_map_leaving_the_folder_is_refused(dirs, tmp_path):
    import json

    from vidrt.models.diffusers_io import SafetensorsFolder
    d = tmp_path / "transformer"
    shutil.copytree(dirs["sharded"] / "transformer", d)
    index = d / "diffusion_pytorch_model.safetensors.index.json"
    meta = json.loads(index.read_text())
    key = next(iter(meta["weight_map"]))
    meta["weight_map"][key] = "../../elsewhere.safetensors"
    index.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="not a .safetensors file in"):
        SafetensorsFolder(d)


def test_a_block_missing_from_the_weights_is_refused_at_load(dirs, tmp_path):
    """Every block's keys and shapes are checked against the config when the skeleton loads (on the meta device),
    not when the export reaches that block: the error names the missing key."""
    from safetensors.torch import load_file, save_file

    from vidrt.families.wan.family import WanFamily
    d = tmp_path / "wan"
    shutil.copytree(dirs["t2v"], d)
    f = d / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(f)
    del state["blocks.1.ffn.net.2.weight"]
    save_file(state, f)
    with pytest.raises(ConfigError, match=r"lack blocks\.1\.ffn\.net\.2\.weight"):
        WanFamily.from_dir(d, stream_dit=True)
