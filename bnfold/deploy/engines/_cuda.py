"""CUDA streams and events for GPU timing, through torch (imported only when a GPU engine runs).

Both ONNX Runtime and TensorRT run on a stream we create here, so the events recorded around a
run bracket exactly that run's work on the device.
"""

from __future__ import annotations


class CudaTimer:
    """A private CUDA stream with a start/end event pair: `start()`, enqueue work, `stop()`."""

    def __init__(self, torch_module):
        self._torch = torch_module
        self.stream = torch_module.cuda.Stream()
        self._start = torch_module.cuda.Event(enable_timing=True)
        self._end = torch_module.cuda.Event(enable_timing=True)

    @property
    def stream_handle(self) -> int:
        """The raw cudaStream_t, for libraries that take one (ORT user_compute_stream, TRT)."""
        return self.stream.cuda_stream

    def start(self) -> None:
        self._start.record(self.stream)

    def stop(self) -> float:
        """Record the end event, wait for it, and return the device time in milliseconds."""
        self._end.record(self.stream)
        self._end.synchronize()
        return self._start.elapsed_time(self._end)


def torch_cuda():
    """torch when it is installed with a usable CUDA device, else None."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def cuda_timer() -> CudaTimer | None:
    torch = torch_cuda()
    return CudaTimer(torch) if torch is not None else None


def device_name() -> str | None:
    torch = torch_cuda()
    return torch.cuda.get_device_name(0) if torch is not None else None


def compute_capability() -> tuple[int, int] | None:
    torch = torch_cuda()
    return tuple(torch.cuda.get_device_capability(0)) if torch is not None else None
