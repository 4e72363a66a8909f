"""The compiled LRN kernels: built with ``torch.utils.cpp_extension`` on first use, cached.

Loading a build registers its implementation of the ``convnet::lrn_forward`` and
``convnet::lrn_backward`` operators (defined in ``ops.py``). ``get(name)`` returns
``fn(x, size, alpha, beta, k) -> Tensor`` (differentiable through the operators' registered
backward) or None when the kernel cannot be built or run here; ``failure(name)`` then says why.
Builds land in ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) and are reused
by later processes until the sources or flags change.
"""

from __future__ import annotations

import functools
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

from convnet.core import cpp_kernels
from convnet.plugins.lrn import ops

CSRC = Path(__file__).resolve().parent / "csrc"
KERNELS = ("cpu", "cuda")

LrnFn = Callable[[torch.Tensor, int, float, float, float], torch.Tensor]

_failures: dict[str, str] = {}


def build(name: str, verbose: bool = False) -> None:
    """Build (or find in the cache) and load one kernel; raises when it cannot."""
    if name == "cpu":
        cpp_kernels.load_cpu("convnet_lrn_cpu", [CSRC / "lrn_cpu.cpp"], [CSRC], verbose=verbose)
    elif name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device")
        if cpp_kernels.cpp_extension().CUDA_HOME is None:
            raise RuntimeError("no CUDA toolkit (nvcc) found; set CUDA_HOME")
        cpp_kernels.load("convnet_lrn_cuda", [CSRC / "lrn_cuda.cu"], [CSRC], ["-O3"], ["-O3"], verbose=verbose)
    else:
        raise ValueError(f"unknown LRN kernel {name!r}; expected one of {', '.join(KERNELS)}")


def build_ahead(name: str, verbose: bool = False) -> str:
    """For ``convnet build-kernels``: build and load ``name``, or say why it is skipped.

    Raises RuntimeError (with the compiler's complaint) when a build that should work fails.
    """
    if name == "cuda" and not torch.cuda.is_available():
        return "skipped: no CUDA device here (tests/test_lrn_cuda.py still compiles it with nvcc)"
    build(name, verbose=verbose)
    return f"built and loaded (cached under {cpp_kernels.cache_root()})"


def compile_cuda_object(out_dir: Path, arch: str = "90") -> Path:
    """Compile the CUDA source to an object file with nvcc, without loading it (no GPU needed).

    Uses torch's include paths and nvcc flags, one architecture (sm_90 by default) to keep it
    short. Raises RuntimeError with nvcc's output when it fails or nvcc is missing.
    """
    cpp_extension = cpp_kernels.cpp_extension()
    nvcc = cpp_kernels.find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda*)")
    out = Path(out_dir) / "lrn_cuda.o"
    includes = [flag for path in cpp_extension.include_paths("cuda") for flag in ("-isystem", path)]
    cmd = [
        nvcc,
        "-c",
        str(CSRC / "lrn_cuda.cu"),
        "-o",
        str(out),
        "-std=c++20",
        "-O3",
        "-Xcompiler",
        "-fPIC",
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
        "-DTORCH_EXTENSION_NAME=convnet_lrn_cuda",
        *cpp_extension.COMMON_NVCC_FLAGS,
        f"-I{CSRC}",
        *includes,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"nvcc failed ({done.returncode}):\n{done.stderr or done.stdout}")
    return out


@functools.cache
def get(name: str) -> LrnFn | None:
    """The kernel ``name`` ("cpu" or "cuda") as a differentiable function, or None."""
    try:
        build(name)
    except Exception as exc:
        _failures[name] = cpp_kernels.one_line(exc)
        return None
    _failures.pop(name, None)
    device = "cpu" if name == "cpu" else "cuda"

    def run(x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
        if x.device.type != device:
            raise RuntimeError(f"LRN impl {name!r} needs a {device} tensor, got one on {x.device}")
        return ops.lrn(x, size, alpha, beta, k)

    return run


def failure(name: str) -> str | None:
    """Why ``get(name)`` returned None, if it did."""
    return _failures.get(name)
