"""Builds dafast._C from csrc/: the CPU kernels always, the CUDA kernels when torch has CUDA.

    pip install --no-build-isolation -e .

Knobs (environment variables):
    DAFAST_SKIP_CUDA=1      build the CPU kernels only, even with a CUDA torch and nvcc
    TORCH_CUDA_ARCH_LIST    GPU architectures to compile for (default "8.0;9.0+PTX": sm_80 and
                            sm_90 code, and PTX that newer GPUs compile when they load it)
    MAX_JOBS                parallel compile jobs (default: cores, capped by free memory)

The CUDA build is chosen by `torch.version.cuda` and nvcc, not by a visible GPU: build
machines often have none.
"""

import os
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

ROOT = Path(__file__).resolve().parent  # absolute: ninja compiles from a build directory
CSRC = ROOT / "csrc"
GIB = 1 << 30


def want_cuda() -> bool:
    if os.environ.get("DAFAST_SKIP_CUDA", "0") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def cap_parallel_jobs(gib_per_job: float) -> None:
    """A compile job of torch's headers takes ~1.5 GiB (nvcc more): fit the jobs in memory."""
    if "MAX_JOBS" in os.environ:
        return
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return
    jobs = max(1, min(os.cpu_count() or 1, int(available / (gib_per_job * GIB))))
    os.environ["MAX_JOBS"] = str(jobs)


def relative(paths):
    return sorted(str(p.relative_to(ROOT)) for p in paths)


def extension():
    # -fno-trapping-math (as in torch's own build) lets GCC vectorise loops with selects.
    cxx_flags = ["-O3", "-fopenmp", "-Wall", "-fno-trapping-math"]
    sources = relative([CSRC / "ops.cpp", *(CSRC / "cpu").glob("*.cpp")])
    include_dirs = [str(CSRC), str(CSRC / "include")]
    if not want_cuda():
        cap_parallel_jobs(gib_per_job=1.5)
        return CppExtension(
            "dafast._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    # Without PTX a GPU newer than sm_90 finds "no kernel image"; with it the driver JIT-compiles.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    cap_parallel_jobs(gib_per_job=3.0)
    sources += relative([CSRC / "ops_cuda.cpp", *(CSRC / "cuda").glob("*.cu")])
    return CUDAExtension(
        "dafast._C",
        sources,
        include_dirs=include_dirs,
        define_macros=[("DAFAST_WITH_CUDA", None)],
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-lineinfo", "--Werror", "all-warnings"],
        },
        extra_link_args=["-fopenmp"],
    )


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension})
