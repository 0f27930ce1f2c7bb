"""NVML telemetry is read from the GPU the point ran on (benches.gpu), checked with a stand-in
pynvml and torch.cuda (no GPU here): NVML numbers every GPU of the machine, CUDA only the visible
ones, so with CUDA_VISIBLE_DEVICES=3 CUDA's device 0 is NVML's device 3."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from benches import gpu


class _Props:
    def __init__(self, uuid):
        self.uuid = uuid


def _fake(monkeypatch, uuids: list[str | None], current: int = 0):
    """A machine of NVML GPUs 0..3 whose CUDA-visible devices have ``uuids`` (None: torch gives no UUID)."""
    nvml = types.ModuleType("pynvml")
    nvml.NVML_CLOCK_SM, nvml.NVML_TEMPERATURE_GPU = 1, 0
    nvml.nvmlClocksThrottleReasonGpuIdle = 1
    by_uuid = {f"GPU-uuid-{i}".encode(): i for i in range(4)}
    nvml.nvmlInit = lambda: None
    nvml.nvmlDeviceGetHandleByUUID = lambda u: by_uuid[u]
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i
    nvml.nvmlDeviceGetCurrentClocksThrottleReasons = lambda h: 0
    nvml.nvmlDeviceGetClockInfo = lambda h, kind: 1000 + h  # the handle shows in the clock
    nvml.nvmlDeviceGetPowerUsage = lambda h: 100_000
    nvml.nvmlDeviceGetTemperature = lambda h, kind: 50
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: _Props(uuids[i]))


@pytest.mark.parametrize("device,clock", [("cuda", 1003), ("cuda:0", 1003), ("cuda:1", 1001), ("cpu", 1003)])
def test_telemetry_comes_from_the_gpu_the_device_names(monkeypatch, device, clock):
    """CUDA_VISIBLE_DEVICES=3,1: CUDA's 0 and 1 are NVML's 3 and 1 (the old code read NVML's 0)."""
    _fake(monkeypatch, ["uuid-3", "uuid-1"])
    assert gpu.nvml_telemetry(device)["gpu_sm_clock_mhz"] == str(clock)


def test_without_a_uuid_from_torch_the_cuda_index_is_used(monkeypatch):
    _fake(monkeypatch, [None, None], current=1)
    assert gpu.nvml_telemetry("cuda:0")["gpu_sm_clock_mhz"] == "1000"
    assert gpu.nvml_telemetry("cuda")["gpu_sm_clock_mhz"] == "1001"  # the current device
