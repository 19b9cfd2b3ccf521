"""The peak memory a report records is its own process's, not inherited from the process that started it."""

import subprocess
import sys

from lmms_talo.memory import peak_resident_mb, process_memory

_CHILD = "from lmms_talo.memory import process_memory; print(process_memory()['peak_rss_mb'])"


def _touch(megabytes: int) -> bytearray:
    block = bytearray(megabytes * 2**20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    return block


def test_a_child_started_by_a_large_process_reports_its_own_peak():
    """Linux's ru_maxrss would hand the child this process's peak (the demo's driver builds a model
    before it starts the harnesses)."""
    held = _touch(1024)
    assert peak_resident_mb() > 1024
    child = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, check=True, timeout=300)
    assert float(child.stdout.split()[-1]) < peak_resident_mb() - 512
    del held


def test_the_peak_covers_what_is_resident_and_what_was():
    before = process_memory()
    assert 0 < before["rss_mb"] <= before["peak_rss_mb"]
    _touch(256)
    assert process_memory()["peak_rss_mb"] >= before["rss_mb"] + 200
