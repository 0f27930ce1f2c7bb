"""GPU facts recorded with every result row: NVML telemetry and allocator peak memory.

On a machine without a GPU (or without nvidia-ml-py) every field says "not available: <reason>",
so result tables keep one schema everywhere.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["nvml_telemetry", "cuda_peak_bytes"]

_FIELDS = ("gpu_sm_clock_mhz", "gpu_power_w", "gpu_temperature_c", "gpu_throttle_reasons")


def _nvml_handle(pynvml, device: str):
    """NVML's handle of the CUDA device ``device`` ("cuda", "cuda:N"; a CPU device: the current
    CUDA device). NVML numbers every GPU of the machine, CUDA only the visible ones, in its own
    order (CUDA_VISIBLE_DEVICES=3: CUDA's 0 is NVML's 3), so the device is found by its UUID;
    by index only where torch gives no UUID."""
    dev = torch.device(device)
    index = dev.index if dev.type == "cuda" and dev.index is not None else torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is not None:
        text = str(uuid)
        text = text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"  # (torch prints the bare UUID)
        return pynvml.nvmlDeviceGetHandleByUUID(text.encode())  # (nvidia-ml-py passes it as a char*)
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def nvml_telemetry(device: str = "cuda") -> dict[str, str]:
    """SM clock (MHz), power (W), temperature (C) and active clock-throttle reasons of the GPU
    that ``device`` names, read now."""
    if not torch.cuda.is_available():
        return {f: "not available: no GPU (torch.cuda.is_available() is False)" for f in _FIELDS}
    try:
        import pynvml
    except ImportError:
        return {f: "not available: nvidia-ml-py not installed (pip install '.[cuda]')" for f in _FIELDS}
    try:
        pynvml.nvmlInit()
        h = _nvml_handle(pynvml, device)
        reasons = pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(h)
        names = [name[len("nvmlClocksThrottleReason"):] for name in dir(pynvml)
                 if name.startswith("nvmlClocksThrottleReason") and name != "nvmlClocksThrottleReasonAll"
                 and isinstance(getattr(pynvml, name), int) and getattr(pynvml, name) & reasons]
        return {
            "gpu_sm_clock_mhz": str(pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)),
            "gpu_power_w": f"{pynvml.nvmlDeviceGetPowerUsage(h) / 1000:.1f}",
            "gpu_temperature_c": str(pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)),
            "gpu_throttle_reasons": ",".join(sorted(names)) or "none",
        }
    except Exception as exc:  # NVML errors must not lose a measurement
        return {f: f"not available: NVML error {exc}" for f in _FIELDS}


def cuda_peak_bytes(fn: Callable[[], object], device: str = "cuda") -> int:
    """Bytes the caching allocator's peak rises above its current use during ``fn()``."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before
