"""Every CUDA kernel source compiles with nvcc, warnings as errors, for sm_70/sm_80/sm_90 (or the
oldest architecture this nvcc still supports), with the include directories and defines the run-time
NVRTC loader uses (ttrec.cuda.launch.common_options). When an NVRTC library is present (CuPy's
``nvidia-cuda-nvrtc`` wheel, a CUDA toolkit with lib64/libnvrtc.so, or ``TTREC_NVRTC_LIBRARY``),
the sources are also compiled by NVRTC itself with the loader's exact options.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import pytest

from ttrec.cuda import launch as plan

REQUESTED = ("sm_70", "sm_80", "sm_90")
NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if Path("/usr/local/bin/nvcc").exists() else None)
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed (no CUDA toolkit on this machine)")


@lru_cache(maxsize=1)
def supported_archs() -> tuple[str, ...]:
    out = subprocess.run([NVCC, "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout
    return tuple(sorted({f"sm_{m}" for m in re.findall(r"compute_(\d+)", out)}, key=lambda a: int(a[3:])))


def archs_to_build() -> list[str]:
    """The requested architectures this nvcc supports, plus its oldest one when it dropped one of them."""
    have = supported_archs()
    archs = [a for a in REQUESTED if a in have]
    if len(archs) < len(REQUESTED) and have and have[0] not in archs:
        archs.insert(0, have[0])
    return archs


@pytest.fixture(scope="module")
def nvcc_results(tmp_path_factory):
    """Compile every source once for all architectures, two nvcc processes at a time."""
    out_dir = tmp_path_factory.mktemp("nvcc")
    archs = archs_to_build()

    def build(src: Path):
        cmd = plan.nvcc_command(src, archs, out_dir / f"{src.stem}.o", nvcc=NVCC)
        return subprocess.run(cmd, capture_output=True, text=True), cmd

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(plan.SOURCES, pool.map(build, plan.SOURCES))), archs, out_dir


@pytest.mark.parametrize("source", plan.SOURCES, ids=lambda p: p.name)
def test_source_compiles_with_nvcc_werror(nvcc_results, source):
    results, archs, out_dir = nvcc_results
    done, cmd = results[source]
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}\n{done.stderr}"
    assert "warning" not in (done.stdout + done.stderr).lower()
    obj = (out_dir / f"{source.stem}.o").read_bytes()
    for arch in archs:  # the fat binary embeds one cubin per architecture, with its ptxas options
        assert f"-arch {arch} ".encode() in obj, f"no {arch} code in {source.stem}.o"


@pytest.mark.parametrize("arch", REQUESTED)
def test_requested_architecture_is_built_or_unsupported(nvcc_results, arch):
    results, archs, out_dir = nvcc_results
    if arch not in supported_archs():
        version = subprocess.run([NVCC, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
        pytest.skip(f"{arch} is not supported by this nvcc ({version}): `nvcc --list-gpu-arch` starts at "
                    f"{supported_archs()[0]}, which is compiled instead (CUDA 13 dropped Volta); sm_70 is built by NVRTC 12 in test_source_compiles_with_nvrtc_and_the_loader_options")
    assert arch in archs
    for source in plan.SOURCES:
        assert results[source][0].returncode == 0
        assert f"-arch {arch} ".encode() in (out_dir / f"{source.stem}.o").read_bytes()


def test_a_warning_fails_the_build(tmp_path):
    """The flags really turn warnings into errors (an unused variable is a warning in nvcc)."""
    src = tmp_path / "warn.cu"
    src.write_text('#include "tt_common.cuh"\nextern "C" __global__ void k(float* x) { int unused = 3; x[0] = 1.f; }\n')
    done = subprocess.run(plan.nvcc_command(src, ["sm_80"], tmp_path / "warn.o", nvcc=NVCC), capture_output=True, text=True)
    assert done.returncode != 0 and "unused" in done.stderr


def _find_nvrtc() -> str | None:
    env = os.environ.get("TTREC_NVRTC_LIBRARY")
    if env:
        return env
    candidates = []
    try:
        import nvidia  # the nvidia-cuda-nvrtc wheel CuPy uses

        for root in nvidia.__path__:
            candidates += sorted(glob.glob(f"{root}/cuda_nvrtc/lib/libnvrtc.so*"))
            candidates += sorted(glob.glob(f"{root}/cu*/lib/libnvrtc.so*"))
    except ImportError:
        pass
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates += sorted(glob.glob(f"{home}/lib64/libnvrtc.so*"))
    found = ctypes.util.find_library("nvrtc")
    if found:
        candidates.append(found)
    candidates = [c for c in candidates if "builtins" not in c and "alt" not in Path(c).name]
    return candidates[0] if candidates else None


@pytest.mark.parametrize("arch", ["sm_70", "sm_80", "sm_90"])
@pytest.mark.parametrize("source", plan.SOURCES, ids=lambda p: p.name)
def test_source_compiles_with_nvrtc_and_the_loader_options(source, arch):
    """NVRTC is the loader's compiler: it builds real SASS (a cubin) for each architecture, sm_70
    included (the nvidia-cuda-nvrtc-cu12 wheel the test extra installs still targets Volta)."""
    path = _find_nvrtc()
    if path is None:
        pytest.skip("no NVRTC library here (it comes with `pip install .[cuda]` or a CUDA toolkit's lib64)")
    lib = ctypes.CDLL(path)
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source.read_bytes(), source.name.encode(), 0, None, None) == 0
    options = [*plan.nvrtc_options(), f"--gpu-architecture={arch}"]
    argv = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
    rc = lib.nvrtcCompileProgram(prog, len(options), argv)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    cubin = ctypes.c_size_t()
    cubin_rc = lib.nvrtcGetCUBINSize(prog, ctypes.byref(cubin)) if rc == 0 else -1
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    assert rc == 0, log.value.decode()
    # the toolkit's own notice that pre-sm_75 targets are deprecated is about the target, not our code
    warnings = [line for line in log.value.decode().splitlines()
                if "warning" in line.lower() and "are deprecated and may be removed" not in line]
    assert not warnings, log.value.decode()
    assert cubin_rc == 0 and cubin.value > 1000, f"no {arch} machine code produced"
