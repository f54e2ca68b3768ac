"""`bound_heap`: freed memory does not stay resident in glibc's heaps (glibc only)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest

from workers.stream.app import HEAP_ARENAS

# Run in a fresh interpreter: mallopt's settings last for the process, and arenas
# are made as threads first allocate.
PROBE = textwrap.dedent(
    """
    import ctypes, os, sys, tempfile, threading
    from workers.stream.app import bound_heap

    if sys.argv[1] == "bounded":
        bound_heap()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]

    # glibc's dynamic threshold rises to the size of a mapped block once it is freed:
    # a later, smaller block then comes from the heap and stays there when freed.
    libc.free(libc.malloc(8 << 20))

    together = threading.Barrier(6)

    def allocate():  # all threads alive at once: each gets a heap of its own by default
        small = libc.malloc(1000)
        together.wait()
        libc.free(libc.malloc(4 << 20))
        together.wait()
        libc.free(small)

    threads = [threading.Thread(target=allocate) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with tempfile.NamedTemporaryFile("r") as report:
        libc.fopen.restype = ctypes.c_void_p
        libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
        libc.fclose.argtypes = [ctypes.c_void_p]
        stream = libc.fopen(report.name.encode(), b"w")
        libc.malloc_info(0, stream)
        libc.fclose(stream)
        info = report.read()
    heaps = info.count("<heap nr=")
    # Bytes kept in the heaps' free lists after every block was freed.
    kept = sum(int(line.split('size="')[1].split('"')[0])
               for line in info.splitlines() if line.strip().startswith('<total type="rest"'))
    print(heaps, kept)
    """
)


def probe(mode: str) -> tuple[int, int]:
    """The probe in a fresh interpreter, without the caller's own malloc tuning."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env
    ).stdout.split()
    return int(out[0]), int(out[1])


def glibc() -> bool:
    try:
        return hasattr(ctypes.CDLL(None), "malloc_info")
    except OSError:
        return False


@pytest.mark.skipif(not glibc(), reason="glibc's malloc only")
def test_freed_large_blocks_go_back_and_threads_share_few_heaps() -> None:
    heaps, kept = probe("default")
    bounded_heaps, bounded_kept = probe("bounded")
    # Without the bound: a heap per thread, and the threads' 4 MB blocks kept in them;
    # with it, not one of those blocks (what is left is the interpreter's own).
    assert heaps > HEAP_ARENAS and kept >= 6 * (4 << 20)
    assert bounded_heaps <= HEAP_ARENAS and bounded_kept < 4 << 20
