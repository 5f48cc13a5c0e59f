"""Build script for kvmem.

The C++ extension ``kvmem._C`` always contains the CPU kernels (csrc/torch_bindings.cpp +
csrc/common/*.cpp + csrc/<op>/cpu.cpp, built with -O3 and OpenMP). When the installed torch has
CUDA and nvcc is found (CUDA_HOME) and csrc/<op>/cuda*.cu sources exist, it becomes a
CUDAExtension with those kernels too, compiled for TORCH_CUDA_ARCH_LIST (default
"8.0;8.6;8.9;9.0a"). A new op folder csrc/<op>/ needs no edit here.

Environment variables:
  KVMEM_SKIP_EXT=1      build no extension (pure Python install; the Triton / reference paths only)
  TORCH_CUDA_ARCH_LIST  CUDA architectures to compile for
  MAX_JOBS              parallel compile jobs (ninja)
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0a"


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _extensions():
    if os.environ.get("KVMEM_SKIP_EXT", "0") not in ("", "0"):
        return [], {}

    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = ["csrc/torch_bindings.cpp"] + _rel(
        glob.glob(os.path.join(ROOT, "csrc", "common", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "*", "cpu.cpp"))
    )
    cuda_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "*", "cuda*.cu")))  # cuda.cu + its parts
    with_cuda = bool(torch.version.cuda) and CUDA_HOME is not None and len(cuda_sources) > 0

    # The sources are C++17. The -std flag is left to torch's BuildExtension, which appends the
    # standard its own headers need (c++17 up to torch 2.9, c++20 from 2.10 on): forcing c++17 on
    # a newer torch gives header warnings, and nvcc refuses two -std flags.
    if sys.platform == "win32":
        cxx_flags = ["/O2", "/openmp", "/DKVMEM_PYTHON_MODULE"]
        link_flags = []
    else:
        # -ffp-contract=fast: let the compiler fuse a*b+c into FMA where the target has it (ISO
        # -std= modes turn contraction off otherwise). -fno-wrapv undoes the -fwrapv that Python's
        # own CFLAGS add: with wrapping int arithmetic, GCC cannot prove `p[i + w]` contiguous and
        # emulates gathers in the vector loops.
        cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-wrapv", "-DKVMEM_PYTHON_MODULE"]
        link_flags = ["-fopenmp"]

    define_macros = []
    if not with_cuda:
        return [
            CppExtension(
                name="kvmem._C",
                sources=sources,
                include_dirs=[os.path.join(ROOT, "csrc")],
                define_macros=define_macros,
                extra_compile_args={"cxx": cxx_flags},
                extra_link_args=link_flags,
            )
        ], {"build_ext": BuildExtension.with_options(use_ninja=True)}

    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_CUDA_ARCHS
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # read by torch when it picks -gencode flags
    archs_str = ";".join(a for a in archs.replace(" ", ";").split(";") if a)
    define_macros.append(("KVMEM_WITH_CUDA", None))
    # Only the host C++ compile sees the arch string (a ';'-list is awkward inside nvcc flags).
    cxx_flags = cxx_flags + [f'-DKVMEM_CUDA_ARCHS="{archs_str}"']
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-DKVMEM_PYTHON_MODULE"]
    return [
        CUDAExtension(
            name="kvmem._C",
            sources=sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    ], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="kvmem",
    version="0.1.0",
    description="Paged KV-cache memory management and attention kernels for PyTorch",
    packages=find_packages(include=["kvmem", "kvmem.*"]),
    package_data={"kvmem": ["verified/*.json"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "safetensors", "tqdm", "numpy"],
    extras_require={
        "test": ["pytest", "hypothesis", "pytest-benchmark", "expecttest"],
        "triton": ["triton"],
        "hf": ["transformers>=5.17,<6", "gguf", "accelerate"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
