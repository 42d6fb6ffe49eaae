"""ONNX graphs on disk, by path: weights past a threshold in one `<graph>.data` side file, streamed a tensor at a time,
so no graph is ever serialized whole (protobuf stops at 2 GB) and no step holds a second copy of the weights.

    model = onnx.load(path, load_external_data=False)   # the graph; external weights stay on disk
    w = tensor_array(model.graph.initializer[0], path.parent)
    save_graph(model, out, base_dir=path.parent)        # its own out.data (or inline under the threshold)
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnx.external_data_helper import ExternalDataInfo

EXTERNAL_DATA_THRESHOLD = 2 * 1024 ** 3 - 64 * 1024 ** 2  # protobuf's 2 GB limit, with headroom
INLINE_BELOW = 1024   # tensors smaller than this stay in the graph (shapes, scales, zero points)
ALIGN = 64 * 1024     # offsets in a .data file: page- and allocation-granularity aligned, so a runtime can mmap them
_CHUNK = 64 * 1024 ** 2


def is_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


def _source(t: TensorProto, base_dir: Path) -> tuple[Path, int, int]:
    """(file, offset, length) of an external tensor; refuses a location that leaves `base_dir`."""
    info = ExternalDataInfo(t)
    loc = Path(info.location)
    if not info.location or loc.is_absolute() or ".." in loc.parts:
        raise ValueError(f"tensor {t.name}: external data location {info.location!r} is not a file beside the graph")
    f = Path(base_dir) / loc
    length = info.length if info.length is not None and info.length > 0 else f.stat().st_size - (info.offset or 0)
    return f, int(info.offset or 0), int(length)


def tensor_bytes(t: TensorProto) -> int:
    """Bytes of a tensor's data, inline or external (without reading it)."""
    if is_external(t):
        info = ExternalDataInfo(t)
        if info.length:
            return int(info.length)
    return int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def raw_bytes(t: TensorProto, base_dir: Path | None) -> bytes:
    """A tensor's data as raw little-endian bytes, read from its side file if it is external."""
    if is_external(t):
        f, off, n = _source(t, Path(base_dir or "."))
        with open(f, "rb") as fh:
            fh.seek(off)
            data = fh.read(n)
        if len(data) != n:
            raise ValueError(f"tensor {t.name}: {f.name} ends before its {n} bytes at offset {off} (truncated)")
        return data
    if t.HasField("raw_data"):
        return t.raw_data
    return numpy_helper.to_array(t).tobytes()


def tensor_array(t: TensorProto, base_dir: Path | None = None) -> np.ndarray:
    """An initializer's values as float32 (bfloat16 and float8 through torch's conversions: numpy has neither)."""
    if t.data_type in (TensorProto.BFLOAT16, TensorProto.FLOAT8E4M3FN):
        import torch
        bits = np.frombuffer(raw_bytes(t, base_dir), np.int16 if t.data_type == TensorProto.BFLOAT16 else np.uint8)
        dt = torch.bfloat16 if t.data_type == TensorProto.BFLOAT16 else torch.float8_e4m3fn
        return torch.from_numpy(bits.copy()).view(dt).float().numpy().reshape(tuple(t.dims))
    if not is_external(t):
        return numpy_helper.to_array(t).astype(np.float32)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    return np.frombuffer(raw_bytes(t, base_dir), dtype).reshape(tuple(t.dims)).astype(np.float32)


def all_tensors(model: onnx.ModelProto):
    """Every tensor that can hold weights: initializers and node attributes (torch's exporter stores big Constant
    values as external data too), in subgraphs as well."""
    def graph(g):
        yield from g.initializer
        for n in g.node:
            for a in n.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                if a.HasField("g"):
                    yield from graph(a.g)
                for sub in a.graphs:
                    yield from graph(sub)
    yield from graph(model.graph)


def weight_bytes(model: onnx.ModelProto) -> int:
    return sum(tensor_bytes(t) for t in all_tensors(model))


def load_inline(t: TensorProto, base_dir: Path | None) -> None:
    """Read an external tensor's data into the tensor (in place), so its graph no longer needs the side file."""
    if is_external(t):
        data = raw_bytes(t, base_dir)
        del t.external_data[:]
        t.data_location = TensorProto.DEFAULT
        t.raw_data = data


def _copy_to(t: TensorProto, base_dir: Path | None, out, loc: str) -> None:
    """Append a tensor's bytes to the open side file `out` at an aligned offset and point the tensor at them."""
    pad = -out.tell() % ALIGN
    out.write(b"\0" * pad)
    off = out.tell()
    if is_external(t):  # copied in chunks: a 2 GB tensor never sits in memory
        f, src_off, n = _source(t, Path(base_dir or "."))
        with open(f, "rb") as fh:
            fh.seek(src_off)
            left = n
            while left:
                chunk = fh.read(min(_CHUNK, left))
                if not chunk:
                    raise ValueError(f"tensor {t.name}: {f.name} ends before its {n} bytes (truncated)")
                out.write(chunk)
                left -= len(chunk)
    else:
        n = out.write(raw_bytes(t, None))
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        t.ClearField(field)
    del t.external_data[:]
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", loc), ("offset", str(off)), ("length", str(n))):
        e = t.external_data.add()
        e.key, e.value = k, v


def save_graph(model: onnx.ModelProto, path: str | Path, base_dir: str | Path | None = None,
               threshold: int | None = None) -> Path:
    """Write `model` to `path`. Its tensors (initializers, Constant values) may be in memory or external (files under
    `base_dir`, default the folder of `path`). Past `threshold` bytes (default EXTERNAL_DATA_THRESHOLD) every tensor
    of INLINE_BELOW bytes or more goes to the one side file `path.data`, streamed; else all are inline. `model` is
    changed in place (its tensors then point at the new file). The side file is written beside it first and renamed,
    so `path` may be the graph being read from."""
    path = Path(path)
    base = Path(base_dir) if base_dir is not None else path.parent
    limit = EXTERNAL_DATA_THRESHOLD if threshold is None else threshold
    data = path.with_name(path.name + ".data")
    if weight_bytes(model) <= limit:
        for t in all_tensors(model):
            load_inline(t, base)
        onnx.save_model(model, str(path))
        data.unlink(missing_ok=True)  # a stale side file of an earlier, bigger graph of this name
        return path
    tmp = path.with_name(f".{data.name}.{os.getpid()}.partial")
    try:
        with open(tmp, "wb") as out:
            for t in all_tensors(model):
                if tensor_bytes(t) >= INLINE_BELOW:
                    _copy_to(t, base, out, data.name)
                else:
                    load_inline(t, base)
        os.replace(tmp, data)
    finally:
        tmp.unlink(missing_ok=True)
    onnx.save_model(model, str(path))
    return path


def data_files(path: str | Path) -> list[str]:
    """The side files the graph at `path` reads (names relative to its folder)."""
    model = onnx.load(str(path), load_external_data=False)
    return sorted({ExternalDataInfo(t).location for t in all_tensors(model) if is_external(t)})
