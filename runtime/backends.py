"""One backend protocol for every model part (text encoder, DiT step, VAE decoder tile): torch tensors in, one torch
tensor out. The Pipeline calls parts only through it, so it runs unchanged on torch, onnxruntime or TensorRT.

    part = make_part("onnxruntime", "dit", bundle_dir / "dit.fp32.onnx")
    velocity = part(latents, timestep, text, text_mask)

A part object holds per-session state (bound buffers): use one per thread.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

log = logging.getLogger("vidrt")
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
                 reuse_output: bool = False):
        import onnxruntime as ort
        self.name, self.path, self.device = name, Path(path), torch.device(device)
        if not self.path.is_file():
            raise BackendError(f"{self.path} does not exist")
        want = "CUDAExecutionProvider" if self.device.type == "cuda" else "CPUExecutionProvider"
        if want not in ort.get_available_providers():
            raise BackendError(f"onnxruntime here has no {want} (available: {', '.join(ort.get_available_providers())})"
                               f"; install onnxruntime-gpu for CUDA or use device='cpu'")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if basic_opt:  # FP8 Q/DQ MatMul is mis-fused at higher levels (onnxruntime bug)
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        if threads:
            so.intra_op_num_threads = threads
        opts = [{"device_id": self.device.index or 0}] if want == "CUDAExecutionProvider" else [{}]
        self.sess = ort.InferenceSession(str(self.path), so, providers=[want], provider_options=opts)
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
