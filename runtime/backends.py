"""One backend protocol for every model part (text encoder, DiT step, VAE decoder tile): torch tensors in, one torch
tensor out. The Pipeline calls parts only through it, so it runs unchanged on torch, onnxruntime or TensorRT.

    part = make_part("onnxruntime", "dit", bundle_dir / "dit.fp32.onnx")
    velocity = part(latents, timestep, text, text_mask)

A part object holds per-session state (bound buffers): use one per thread.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from .ort import ort_session

INPUTS = {"text_encoder": ("input_ids", "attention_mask"), "dit": ("latents", "timestep", "text", "text_mask"),
          "vae_decoder": ("latents",)}
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


_TRT_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
               "INT32": torch.int32, "BOOL": torch.bool, "INT8": torch.int8}


def pick_profile(name: str, profiles: list[dict], shapes: dict[str, tuple]) -> int:
    """Index of the first optimization profile ({input: (min, opt, max)}) that holds every input shape."""
    for i, prof in enumerate(profiles):
        if all(len(shapes[n]) == len(prof[n][0]) and all(lo <= d <= hi for d, lo, hi in
                                                         zip(shapes[n], prof[n][0], prof[n][2])) for n in prof):
            return i
    served = "; ".join(", ".join(f"{n} {list(p[n][0])}..{list(p[n][2])}" for n in p) for p in profiles)
    raise BackendError(f"{name}: input shapes {shapes} are outside every optimization profile of the engine "
                       f"({served}); export a bundle with this shape as a --bucket")


class SharedDeviceMemory:
    """One scratch allocation shared by every TensorRT engine of a pipeline (they run one after another on one
    stream), sized to the largest engine's need: the activation memory of the text encoder, DiT and VAE is not
    held three times."""

    def __init__(self, device: torch.device):
        self.device, self.buf = device, None

    def reserve(self, nbytes: int) -> int:
        if self.buf is None or self.buf.numel() < nbytes:
            self.buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=self.device)
        return self.buf.data_ptr()


class TrtPart:
    """A TensorRT engine (from a bundle) as a part: one execution context with user-managed (shared) device
    memory, one optimization profile per shape bucket chosen per call, inputs/outputs bound by address
    (set_tensor_address), execute_async_v3 on the current torch CUDA stream. Written against the TensorRT 10/11 API;
    NOT RUN: no machine here has TensorRT."""
    backend = "tensorrt"

    def __init__(self, name: str, path: str | Path, device: str = "cuda", shared: SharedDeviceMemory | None = None):
        try:
            import tensorrt as trt
        except ImportError as e:
            raise BackendError("the tensorrt backend needs the tensorrt Python package (TensorRT 10 or 11 on an NVIDIA "
                               "GPU machine); use backend='onnxruntime' or 'torch' here") from e
        if not torch.cuda.is_available():
            raise BackendError("the tensorrt backend needs a CUDA device and none is visible")
        self.trt, self.name, self.device = trt, name, torch.device(device)
        if self.device.type != "cuda":
            raise BackendError(f"the tensorrt backend runs on a CUDA device, not {device!r}: pass device='cuda'")
        logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise BackendError(f"TensorRT could not load {path} (built by another TensorRT version or GPU?); "
                               "rebuild it with export-engines on this machine")
        self.shared = shared or SharedDeviceMemory(self.device)
        self.ctx = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.profiles = [{n: [tuple(s) for s in self.engine.get_tensor_profile_shape(n, p)] for n in self.inputs}
                         for p in range(self.engine.num_optimization_profiles)]
        self._profile = -1

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        xs = [x.to(self.device, _TRT_DTYPES.get(self.engine.get_tensor_dtype(n).name, x.dtype)).contiguous()
              for n, x in zip(self.inputs, inputs)]  # alive until the call returns
        shapes = {n: tuple(x.shape) for n, x in zip(self.inputs, xs)}
        stream = torch.cuda.current_stream(self.device)
        p = pick_profile(self.name, self.profiles, shapes)
        if p != self._profile:
            self.ctx.set_optimization_profile_async(p, stream.cuda_stream)
            self._profile = p
        for n, x in zip(self.inputs, xs):
            self.ctx.set_input_shape(n, tuple(x.shape))
            self.ctx.set_tensor_address(n, x.data_ptr())
        out = torch.empty(tuple(self.ctx.get_tensor_shape(self.output)), device=self.device,
                          dtype=_TRT_DTYPES[self.engine.get_tensor_dtype(self.output).name])
        self.ctx.set_tensor_address(self.output, out.data_ptr())
        size = getattr(self.engine, "device_memory_size_v2", None) or self.engine.device_memory_size
        ptr = self.shared.reserve(size)
        if hasattr(self.ctx, "set_device_memory"):
            self.ctx.set_device_memory(ptr, size)
        else:
            self.ctx.device_memory = ptr
        if not self.ctx.execute_async_v3(stream.cuda_stream):
            raise BackendError(f"{self.name}: TensorRT execute_async_v3 failed (see the TensorRT log)")
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
