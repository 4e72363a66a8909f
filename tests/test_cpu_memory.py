"""``train.reuse_cpu_memory``: a large CPU tensor freed by one step is reused by the next
without a page fault per page, in the process that sets it; the numbers do not change.

Measured with the kernel's own count of this process's minor page faults (getrusage), in fresh
interpreters: the setting lasts for the process, and the pytest process is left as it was.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from convnet.core import cpu_memory

TINY = Path(__file__).parent / "fixtures" / "recipes" / "tiny.toml"
MIB = 64
PAGES = MIB * 2**20 // 4096

pytestmark = pytest.mark.skipif(
    not cpu_memory.available(),
    reason="train.reuse_cpu_memory is a switch of glibc's malloc, and the C library here is not glibc "
    "(the option then leaves allocation as it is and says so)",
)

# Allocates, fills and frees a 64 MiB tensor over and over, as a training step does with its
# activations, and prints the page faults of the last ROUNDS. The first few rounds grow the heap
# around the interpreter's own small allocations (here: settled by the fifth; 8 for margin).
ROUNDS = 6
MEASURE = f"""
import resource, torch
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():
    t = torch.empty({MIB} * 2**20 // 4); t.fill_(1.0); del t
for _ in range(8):
    step()
before = faults()
for _ in range({ROUNDS}):
    step()
print(faults() - before)
"""


def _faults(setup: str) -> int:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("MALLOC_MMAP_MAX_", None)  # glibc's own environment switches would blur the control
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    done = subprocess.run(
        [sys.executable, "-c", setup + MEASURE], capture_output=True, text=True, timeout=300, env=env, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.strip().splitlines()[-1])


def _huge_pages_always() -> bool:
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@pytest.mark.skipif(
    _huge_pages_always(),
    reason="transparent huge pages are 'always' here: glibc's default then maps 64 MiB in 2 MiB pages, "
    "so page faults cannot show the difference (the test below still checks where blocks go)",
)
def test_a_freed_large_tensor_is_reused_without_page_faults():
    with_ = _faults("from convnet.core import cpu_memory\nassert cpu_memory.reuse_freed_memory()\n")
    assert with_ < PAGES, f"{with_} page faults for {ROUNDS} {MIB} MiB tensors that reuse freed memory"
    without = _faults("")  # glibc's default: a fresh mapping each time, a fault per 4 KiB page
    assert without > ROUNDS * PAGES // 2, f"only {without} page faults for {ROUNDS} fresh {MIB} MiB tensors"
    assert without > 4 * max(with_, 1)


# glibc's own account of the memory it has mapped for single large blocks (hblkhd of mallinfo2,
# or of mallinfo, its int-sized form, before glibc 2.33), printed while a 64 MiB tensor is alive:
# glibc's default maps it apart, the setting puts it in the heap.
MAPPED_APART = f"""
import ctypes, torch
FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
libc = ctypes.CDLL(None)
wide = hasattr(libc, "mallinfo2")
class MallInfo(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t if wide else ctypes.c_int) for name in FIELDS]
info = libc.mallinfo2 if wide else libc.mallinfo
info.restype = MallInfo
t = torch.empty({MIB} * 2**20 // 4)
print(info().hblkhd)
"""


def _mapped_apart(setup: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", setup + MAPPED_APART], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.strip().splitlines()[-1])


def test_a_run_with_the_option_leaves_its_process_allocating_from_the_heap(tmp_path: Path):
    """The engine applies the recipe's option to its process (how much that saves depends on how
    the heap around a run's own allocations settles, so this asks glibc where a block went)."""

    def run(reuse: str) -> str:
        return (
            "import convnet.core as cn\n"
            f"r = cn.load_recipe({str(TINY)!r}, ['train.max_steps=2', 'train.reuse_cpu_memory={reuse}'])\n"
            f"cn.train(r, out={str(tmp_path / reuse)!r}, quiet=True)\n"
        )

    block = MIB * 2**20
    assert _mapped_apart(run("true")) < block, "a 64 MiB tensor was mapped apart after a run with the option"
    assert _mapped_apart(run("false")) >= block, "glibc's default maps a 64 MiB block apart (the control)"


def test_the_run_is_the_same_bit_for_bit(tmp_path: Path):
    """Only where memory comes from changes: the weights of 3 steps are equal with and without."""
    script = (
        "import sys, convnet.core as cn\n"
        "from safetensors.torch import load_file\n"
        "weights = []\n"
        "for reuse in ('false', 'true'):  # once set, it stays for the process: without first\n"
        f"    r = cn.load_recipe({str(TINY)!r}, ['train.max_steps=3', f'train.reuse_cpu_memory={{reuse}}'])\n"
        f"    out = cn.train(r, out={str(tmp_path)!r} + '/' + reuse, quiet=True)['out']\n"
        "    weights.append(load_file(out + '/checkpoints/last.safetensors'))\n"
        "a, b = weights\n"
        "assert [k for k in a if k.startswith('model/')], 'no model tensors in the checkpoint'\n"
        "sys.exit(0 if all(a[k].equal(b[k]) for k in a if k.startswith('model/')) else 3)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
