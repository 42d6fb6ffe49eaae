"""One backend protocol for every model part (text encoder, DiT step, VAE decoder tile): torch tensors in, one torch
tensor out. The Pipeline calls parts only through it, so it runs unchanged on torch, onnxruntime or TensorRT.

    part = make_part("onnxruntime", "dit", bundle_dir / "dit.fp32.onnx")
    velocity = part(latents, timestep, text, text_mask)

A part object holds per-session state (bound buffers): use one per thread.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from vidrt.core.ort import ort_session

BACKENDS = ("torch", "onnxruntime", "tensorrt")


class BackendError(RuntimeError):
    """A backend cannot run here (missing provider/library) or got an input it does not serve; says what to do."""


class Part(Protocol):
    name: str
    backend: str

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor: ...


class TorchPart:
    """An nn.Module as a part; `compile=True` wraps it in torch.compile."""
    backend = "torch"

    def __init__(self, name: str, module: nn.Module, compile: bool = False):
        self.name, self.module = name, module.eval()
        self.fn = torch.compile(self.module, dynamic=False) if compile else self.module

    @torch.no_grad()
    def __call__(self, *inputs):
        return self.fn(*inputs)


_TORCH_TO_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.bool: np.bool_,
                torch.int32: np.int32}


class OrtPart:
    """onnxruntime session. With `io_binding` (always on CUDA) inputs are bound in place from torch tensors and the
    output is written into a preallocated torch tensor of `out_shape(*inputs)`, reused while the shape stays the same;
    with `reuse_output` the caller gets that buffer itself (valid until the next call), otherwise a copy."""
    backend = "onnxruntime"

    def __init__(self, name: str, path: str | Path, device: str = "cpu", basic_opt: bool = False,
                 threads: int | None = None, out_shape=None, io_binding: bool | None = None,
                 reuse_output: bool = False, exact_int8: bool | None = None):
        import onnxruntime as ort
        self.name, self.path, self.device = name, Path(path), torch.device(device)
        if not self.path.is_file():
            raise BackendError(f"{self.path} does not exist")
        want = "CUDAExecutionProvider" if self.device.type == "cuda" else "CPUExecutionProvider"
        if want not in ort.get_available_providers():
            raise BackendError(f"onnxruntime here has no {want} (available: {', '.join(ort.get_available_providers())})"
                               f"; install onnxruntime-gpu for CUDA or use device='cpu'")
        cuda_opts = {"device_id": self.device.index or 0} if self.device.type == "cuda" else None
        self.sess = ort_session(self.path, basic_opt, want, provider_options=cuda_opts, threads=threads,
                                exact_int8=exact_int8)
        self.inputs = [i.name for i in self.sess.get_inputs()]
        self.output = self.sess.get_outputs()[0].name
        self.io_binding = (self.device.type == "cuda") if io_binding is None else io_binding
        if self.io_binding and out_shape is None:
            raise BackendError(f"{name}: IO binding needs the output shape function")
        self.out_shape, self.reuse_output = out_shape, reuse_output
        self._out: torch.Tensor | None = None

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.inputs):
            raise BackendError(f"{self.name}: {len(inputs)} inputs, the graph takes {', '.join(self.inputs)}")
        if not self.io_binding:
            feed = {n: x.detach().cpu().numpy() for n, x in zip(self.inputs, inputs)}
            return torch.from_numpy(self.sess.run([self.output], feed)[0])
        dev, idx = self.device.type, self.device.index or 0
        b = self.sess.io_binding()
        xs = [x.detach().to(self.device).contiguous() for x in inputs]  # alive until run returns
        for n, x in zip(self.inputs, xs):
            b.bind_input(n, dev, idx, _TORCH_TO_NP[x.dtype], list(x.shape), x.data_ptr())
        shape = tuple(self.out_shape(*xs))
        if self._out is None or tuple(self._out.shape) != shape:
            self._out = torch.empty(shape, dtype=torch.float32, device=self.device)
        b.bind_output(self.output, dev, idx, np.float32, list(shape), self._out.data_ptr())
        self.sess.run_with_iobinding(b)
        return self._out if self.reuse_output else self._out.clone()


# TensorRT tensor types by DataType name. INT4/FP4/E8M0 have no torch dtype (4-bit types are packed two per byte):
# an engine with such an input or output is refused at load instead of reading or writing the wrong bytes.
_TRT_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
               "INT32": torch.int32, "BOOL": torch.bool, "INT8": torch.int8, "UINT8": torch.uint8,
               "FP8": torch.float8_e4m3fn}


def trt_torch_dtype(part: str, tensor: str, trt_name: str) -> torch.dtype:
    """The torch dtype of an engine input/output whose TensorRT DataType is named `trt_name`."""
    if trt_name not in _TRT_DTYPES:
        raise BackendError(f"{part}: engine tensor {tensor!r} is TensorRT {trt_name}, which vidrt cannot bind from "
                           f"torch ({', '.join(_TRT_DTYPES)} are supported); keep engine inputs and outputs in one of "
                           "those types (quantize inside the graph)")
    return _TRT_DTYPES[trt_name]


def engine_memory_bytes(engine) -> int:
    """Scratch an execution context needs. device_memory_size_v2 (TensorRT >= 10.1, the only one in 11) may be 0,
    a valid size: fall back to device_memory_size (TensorRT 10.0) only when v2 does not exist."""
    v2 = getattr(engine, "device_memory_size_v2", None)
    return int(v2 if v2 is not None else engine.device_memory_size)


def cuda_device(device: str | torch.device, count: int, current: int) -> torch.device:
    """'cuda' -> the current device, 'cuda:N' -> N (checked against the `count` visible devices)."""
    d = torch.device(device)
    if d.type != "cuda":
        raise BackendError(f"the tensorrt backend runs on a CUDA device, not {str(device)!r}: pass device='cuda'")
    idx = current if d.index is None else d.index
    if not 0 <= idx < count:
        raise BackendError(f"device {str(device)!r}: {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", idx)


def check_inputs(name: str, expected: list[str], shapes: list[tuple]) -> dict[str, tuple]:
    """{input name: shape}, or a BackendError naming the inputs when the count differs."""
    if len(shapes) != len(expected):
        raise BackendError(f"{name}: got {len(shapes)} inputs {[list(s) for s in shapes]}, the engine takes "
                           f"{len(expected)}: {', '.join(expected)}")
    return dict(zip(expected, (tuple(s) for s in shapes)))


def pick_profile(name: str, profiles: list[dict], shapes: dict[str, tuple]) -> int:
    """Index of the first optimization profile ({input: (min, opt, max)}) that holds every input shape."""
    for i, prof in enumerate(profiles):
        if all(len(shapes[n]) == len(prof[n][0]) and all(lo <= d <= hi for d, lo, hi in
                                                         zip(shapes[n], prof[n][0], prof[n][2])) for n in prof):
            return i
    served = "; ".join(", ".join(f"{n} {list(p[n][0])}..{list(p[n][2])}" for n in p) for p in profiles)
    raise BackendError(f"{name}: input shapes {shapes} are outside every optimization profile of the engine "
                       f"({served}); export a bundle with this shape as a --bucket")


def _ok(ret, what: str) -> None:
    if ret is False:  # TensorRT setters return False (and log why) instead of raising
        raise BackendError(f"TensorRT refused {what} (see the TensorRT log above)")


class SharedDeviceMemory:
    """One scratch buffer and one CUDA stream shared by every TensorRT engine of a pipeline: they run one after
    another on that stream, so the text encoder's, DiT's and VAE's activations are not held three times. Engines
    `require` their size when they load; the buffer is made at the first `ptr()` with the largest, and never moves
    once a captured CUDA graph holds it (`hold()`): a graph replays into the address it captured."""

    def __init__(self, device: str | torch.device):
        d = torch.device(device)
        if d.type == "cuda" and d.index is None and torch.cuda.is_available():
            d = torch.device("cuda", torch.cuda.current_device())
        self.device, self.nbytes, self.buf, self.held, self._stream = d, 0, None, False, None

    def require(self, nbytes: int) -> None:
        if nbytes <= self.nbytes:
            return
        if self.held:
            raise BackendError(f"an engine needs {nbytes} bytes of TensorRT scratch, but a captured CUDA graph holds "
                               f"the {self.nbytes}-byte buffer; load every engine before the first graphed call")
        self.nbytes, self.buf = nbytes, None  # eager contexts take ptr() on every call, so it may still move

    def ptr(self) -> int:
        if self.buf is None:
            # allocated on the engines' stream, so the caching allocator orders its reuse after their work
            with torch.cuda.stream(self.stream) if self.device.type == "cuda" else contextlib.nullcontext():
                self.buf = torch.empty(max(self.nbytes, 1), dtype=torch.uint8, device=self.device)
        return self.buf.data_ptr()

    def hold(self) -> None:
        self.ptr()
        self.held = True

    @property
    def stream(self) -> "torch.cuda.Stream":
        # not torch's current stream: that is the legacy default stream unless the caller set one, and TensorRT
        # synchronizes around enqueues on it
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream


class ContextTable:
    """The execution contexts of one engine: one per set of input shapes, made by `make(profile, shapes)`, which sets
    the profile and input shapes once. Running another shape never rewrites a context that a CUDA graph captured;
    a captured context belongs to its graph, and eager calls at its shapes get a context of their own."""

    def __init__(self, make):
        self.make, self.contexts, self.held = make, {}, set()

    def get(self, shapes: dict[str, tuple], profile: int, capturing: bool):
        key = tuple(shapes.items())
        if not capturing and key in self.held:
            key += (("eager", ()),)
        if key not in self.contexts:
            self.contexts[key] = self.make(profile, shapes)
        if capturing:
            self.held.add(key)
        return self.contexts[key]


class TrtPart:
    """A TensorRT engine (from a bundle) as a part: user-managed (shared) scratch, one execution context per input
    shape set (ContextTable), inputs/outputs bound by address, execute_async_v3 on the shared engine stream, ordered
    after the caller's stream and before its next work. Written against the TensorRT 10/11 API; NOT RUN: no machine
    here has TensorRT."""
    backend = "tensorrt"

    def __init__(self, name: str, path: str | Path, device: str = "cuda", shared: SharedDeviceMemory | None = None):
        try:
            import tensorrt as trt
        except ImportError as e:
            raise BackendError("the tensorrt backend needs the tensorrt Python package (TensorRT 10 or 11 on an NVIDIA "
                               "GPU machine); use backend='onnxruntime' or 'torch' here") from e
        if not torch.cuda.is_available():
            raise BackendError("the tensorrt backend needs a CUDA device and none is visible")
        self.trt, self.name = trt, name
        self.device = cuda_device(device, torch.cuda.device_count(), torch.cuda.current_device())
        self.shared = shared or SharedDeviceMemory(self.device)
        if self.shared.device != self.device:
            raise BackendError(f"{name}: the shared TensorRT memory is on {self.shared.device}, the engine on "
                               f"{self.device}; use one SharedDeviceMemory per device")
        with torch.cuda.device(self.device):  # the engine, its contexts and its memory live on self.device
            self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self.engine = self.runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise BackendError(f"TensorRT could not load {path} (built by another TensorRT version or GPU?); "
                               "rebuild it with export-engines on this machine")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(outputs) != 1:
            raise BackendError(f"{name}: vidrt parts have one output; {path} has {outputs}")
        self.output = outputs[0]
        self.dtypes = {n: trt_torch_dtype(name, n, self.engine.get_tensor_dtype(n).name) for n in names}
        self.profiles = [{n: [tuple(s) for s in self.engine.get_tensor_profile_shape(n, p)] for n in self.inputs}
                         for p in range(self.engine.num_optimization_profiles)]
        self.shared.require(engine_memory_bytes(self.engine))  # at load: the buffer is sized before any call
        self.contexts = ContextTable(self._make_context)

    def _make_context(self, profile: int, shapes: dict[str, tuple]):
        ctx = self.engine.create_execution_context(self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if ctx is None:
            raise BackendError(f"{self.name}: TensorRT could not create an execution context (out of memory?)")
        _ok(ctx.set_optimization_profile_async(profile, self.shared.stream.cuda_stream),
            f"{self.name}: optimization profile {profile} ({self.profiles[profile]})")
        for n, s in shapes.items():
            _ok(ctx.set_input_shape(n, s), f"{self.name}: input {n} shape {list(s)}")
        return ctx

    def _set_memory(self, ctx) -> None:
        ptr, size = self.shared.ptr(), self.shared.nbytes
        if hasattr(ctx, "set_device_memory"):  # TensorRT >= 10.1; the device_memory attribute is 10.0's
            ctx.set_device_memory(ptr, size)
        else:
            ctx.device_memory = ptr

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        shapes = check_inputs(self.name, self.inputs, [tuple(x.shape) for x in inputs])
        p = pick_profile(self.name, self.profiles, shapes)
        with torch.cuda.device(self.device):
            caller, stream = torch.cuda.current_stream(self.device), self.shared.stream
            capturing = torch.cuda.is_current_stream_capturing()
            if capturing:
                self.shared.hold()
            xs = [x.to(self.device, self.dtypes[n]).contiguous() for n, x in zip(self.inputs, inputs)]
            ctx = self.contexts.get(shapes, p, capturing)
            out = torch.empty(tuple(ctx.get_tensor_shape(self.output)), device=self.device,
                              dtype=self.dtypes[self.output])
            for n, x in zip(self.inputs, xs):
                _ok(ctx.set_tensor_address(n, x.data_ptr()), f"{self.name}: address of input {n} {list(x.shape)}")
            _ok(ctx.set_tensor_address(self.output, out.data_ptr()), f"{self.name}: address of output {self.output}")
            self._set_memory(ctx)
            # inputs and out were made on the caller's stream (under capture: the graph joins this stream and back);
            # the caller waits before reading out or freeing xs, so the allocator cannot reuse them early
            stream.wait_stream(caller)
            if not ctx.execute_async_v3(stream.cuda_stream):
                raise BackendError(f"{self.name}: TensorRT execute_async_v3 failed for {shapes} (see the TensorRT log)")
            caller.wait_stream(stream)
        return out.float()


def make_part(backend: str, name: str, source, device: str = "cpu", **kw) -> Part:
    """`source`: an nn.Module for torch, an .onnx path for onnxruntime, a .plan path for tensorrt."""
    if backend == "torch":
        return TorchPart(name, source, **kw)
    if backend == "onnxruntime":
        return OrtPart(name, source, device=device, **kw)
    if backend == "tensorrt":
        return TrtPart(name, source, device=device, **kw)
    raise BackendError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")

