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
import glob
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

from convnet.plugins.lrn import ops

CSRC = Path(__file__).resolve().parent / "csrc"
KERNELS = ("cpu", "cuda")

LrnFn = Callable[[torch.Tensor, int, float, float, float], torch.Tensor]

_failures: dict[str, str] = {}


def _cpu_flags() -> list[str]:
    """-O3 plus AVX2/FMA when this CPU has them (the build's name says so, see _cpu_build_name)."""
    flags = ["-O3", "-fno-math-errno", "-fopenmp"]
    if _has_avx2():
        flags += ["-mavx2", "-mfma"]
    return flags


def _has_avx2() -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    words = set(text.split())
    return "avx2" in words and "fma" in words


def _cpu_build_name() -> str:
    return "convnet_lrn_cpu_avx2" if _has_avx2() else "convnet_lrn_cpu"


def _cpp_extension():
    """``torch.utils.cpp_extension``, without its import-time notice that a CPU-only machine
    has no CUDA runtime (true, expected, and printed on every run otherwise)."""
    import logging

    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def _load(
    name: str, sources: list[Path], cflags: list[str], cuda_cflags: list[str] | None = None, verbose: bool = False
) -> None:
    cpp_extension = _cpp_extension()

    cpp_extension.load(
        name=name,
        sources=[str(s) for s in sources],
        extra_cflags=cflags,
        extra_cuda_cflags=cuda_cflags,
        extra_include_paths=[str(CSRC)],
        is_python_module=False,
        verbose=verbose,
    )


def build(name: str, verbose: bool = False) -> None:
    """Build (or find in the cache) and load one kernel; raises when it cannot."""
    if name == "cpu":
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH")
        _load(_cpu_build_name(), [CSRC / "lrn_cpu.cpp"], _cpu_flags(), verbose=verbose)
    elif name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device")
        cpp_extension = _cpp_extension()

        if cpp_extension.CUDA_HOME is None:
            raise RuntimeError("no CUDA toolkit (nvcc) found; set CUDA_HOME")
        _load("convnet_lrn_cuda", [CSRC / "lrn_cuda.cu"], ["-O3"], ["-O3"], verbose=verbose)
    else:
        raise ValueError(f"unknown LRN kernel {name!r}; expected one of {', '.join(KERNELS)}")


def build_ahead(name: str, verbose: bool = False) -> str:
    """For ``convnet build-kernels``: build and load ``name``, or say why it is skipped.

    Raises RuntimeError (with the compiler's complaint) when a build that should work fails.
    """
    if name == "cuda" and not torch.cuda.is_available():
        return "skipped: no CUDA device here (tests/test_lrn_cuda.py still compiles it with nvcc)"
    build(name, verbose=verbose)
    cpp_extension = _cpp_extension()

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return f"built and loaded (cached under {root})"


def find_nvcc() -> str | None:
    """nvcc from PATH, CUDA_HOME / CUDA_PATH, /usr/local/cuda or the newest /usr/local/cuda-*."""
    found = shutil.which("nvcc")
    if found:
        return found
    roots = [
        os.environ.get("CUDA_HOME"),
        os.environ.get("CUDA_PATH"),
        "/usr/local/cuda",
        *sorted(glob.glob("/usr/local/cuda-*"), reverse=True),
    ]
    for root in filter(None, roots):
        candidate = Path(root) / "bin" / "nvcc"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def compile_cuda_object(out_dir: Path, arch: str = "90") -> Path:
    """Compile the CUDA source to an object file with nvcc, without loading it (no GPU needed).

    Uses torch's include paths and nvcc flags, one architecture (sm_90 by default) to keep it
    short. Raises RuntimeError with nvcc's output when it fails or nvcc is missing.
    """
    cpp_extension = _cpp_extension()

    nvcc = find_nvcc()
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
        _failures[name] = _one_line(exc)
        return None
    _failures.pop(name, None)
    device = "cpu" if name == "cpu" else "cuda"

    def run(x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
        if x.device.type != device:
            raise RuntimeError(f"LRN impl {name!r} needs a {device} tensor, got one on {x.device}")
        return ops.lrn(x, size, alpha, beta, k)

    return run


def _one_line(exc: Exception) -> str:
    """The compiler's first ``error:`` line when there is one, else the message's first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    detail = errors[0] if errors else lines[0] if lines else ""
    return f"{type(exc).__name__}: {detail[:300]}"


def failure(name: str) -> str | None:
    """Why ``get(name)`` returned None, if it did."""
    return _failures.get(name)
