"""Building a plugin's C++ and CUDA kernels on first use, with ``torch.utils.cpp_extension``.

A plugin that ships sources (the LRN layer, the paper's SGD step) builds them the same way: one
set of flags, one cache (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``, reused
by later processes until the sources or flags change), one way to say why a build failed. A
factory with a ``build(verbose=False) -> str`` attribute is built ahead of time by ``convnet
build-kernels``.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType


def cpp_extension() -> ModuleType:
    """``torch.utils.cpp_extension``, without its import-time notice that a CPU-only machine
    has no CUDA runtime (true, expected, and printed on every run otherwise)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension as module
    finally:
        logger.setLevel(level)
    return module


def has_avx2() -> bool:
    """Whether this CPU has AVX2 and FMA (Linux's /proc/cpuinfo; False where it cannot tell)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    words = set(text.split())
    return "avx2" in words and "fma" in words


def cpu_flags() -> list[str]:
    """-O3 and OpenMP, plus AVX2/FMA when this CPU has them (``cpu_build_name`` says so)."""
    flags = ["-O3", "-fno-math-errno", "-fopenmp"]
    if has_avx2():
        flags += ["-mavx2", "-mfma"]
    return flags


def cpu_build_name(base: str) -> str:
    """``base``, with ``_avx2`` when built with AVX2/FMA, so the two builds never share a cache."""
    return f"{base}_avx2" if has_avx2() else base


def require_compiler() -> None:
    """Raise RuntimeError when no C++ compiler (``$CXX``, default ``c++``) is on PATH."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler ({cxx}) on PATH")


def load(
    name: str,
    sources: list[Path],
    include_dirs: list[Path],
    cflags: list[str],
    cuda_cflags: list[str] | None = None,
    verbose: bool = False,
) -> None:
    """Build (or find in the cache) and load sources that register operators with
    ``TORCH_LIBRARY_IMPL``; no Python module is imported. Raises when the build fails."""
    cpp_extension().load(
        name=name,
        sources=[str(s) for s in sources],
        extra_cflags=cflags,
        extra_cuda_cflags=cuda_cflags,
        extra_include_paths=[str(d) for d in include_dirs],
        is_python_module=False,
        verbose=verbose,
    )


def load_cpu(
    base: str, sources: list[Path], include_dirs: list[Path], extra_cflags: Sequence[str] = (), verbose: bool = False
) -> None:
    """``load`` for CPU sources: checks for a compiler, uses ``cpu_flags`` (then
    ``extra_cflags``) and ``cpu_build_name``."""
    require_compiler()
    load(cpu_build_name(base), sources, include_dirs, [*cpu_flags(), *extra_cflags], verbose=verbose)


def cache_root() -> str:
    """Where builds are cached: ``TORCH_EXTENSIONS_DIR`` or torch's default."""
    return os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension().get_default_build_root()


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


def one_line(exc: Exception) -> str:
    """A failed build in one line: the compiler's first ``error:`` line when there is one, else
    the message's first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    detail = errors[0] if errors else lines[0] if lines else ""
    return f"{type(exc).__name__}: {detail[:300]}"
