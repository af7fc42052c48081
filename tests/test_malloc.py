"""hardware.keep_freed_memory: a large tensor's memory comes from glibc's heap and stays there when freed."""

from __future__ import annotations

import ctypes.util
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.skipif(
    not hasattr(ctypes.CDLL(ctypes.util.find_library("c") or None), "mallinfo2"), reason="needs glibc >= 2.33"
)

# A fresh process each time: malloc settings are per process. Prints the bytes glibc mapped for a 200 MB
# tensor, then the bytes its heap still holds once the tensor is freed.
PROBE = """
import ctypes, ctypes.util, sys, torch
from rlhf.runtime.malloc import keep_freed_memory
FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS]
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = Mallinfo2
if sys.argv[1] == "keep":
    assert keep_freed_memory()
elif sys.argv[1].startswith("hardware."):  # as a run sets it up: rlhf.app.build.launch on the composed config
    from rlhf.app.build import launch
    from tests.helpers import compose
    launch(compose([sys.argv[1]]))
x = torch.ones(200 << 20, dtype=torch.uint8)
mapped = libc.mallinfo2().hblkhd
del x
print(mapped, libc.mallinfo2().arena)
"""


def probe(mode: str) -> tuple[int, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout
    mapped, heap = map(int, out.split())
    return mapped, heap


def test_large_blocks_stay_in_the_heap_for_reuse():
    mb = 1 << 20
    mapped, heap = probe("default")
    assert mapped >= 200 * mb and heap < 200 * mb  # glibc's default: mapped on allocation, unmapped on free
    mapped, heap = probe("keep")
    assert mapped < 200 * mb and heap >= 200 * mb


@pytest.mark.parametrize("setting", ["true", "false"])
def test_a_run_keeps_freed_memory_unless_told_not_to(setting):
    mapped, heap = probe(f"hardware.keep_freed_memory={setting}")
    assert (mapped < 200 << 20) == (setting == "true")
