"""benchmarks/gpu_check.sh runs as is: its CPU fallback (the smoke version; the CUDA run is a
person's, on a GPU) exits 0 and prints one table with every check."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_cpu_fallback_prints_one_passing_table(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHON_SET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu", "--work", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:  # its per-mode processes too
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    lines = stdout.splitlines()
    table = [line for line in lines if line.startswith("| ")]
    assert table[0].startswith("| check | setting | result |")
    exact = [line for line in table if line.startswith("| hooks = weight edit")]
    assert len(exact) == 4 and all("| bit-exact |" in line for line in exact)  # 2 architectures x bfloat16, float16
    modes = [line.split(" | ")[1].split(" ")[0] for line in table if line.startswith("| sweep mode")]
    assert modes == ["naive", "screen"]
    assert any(line.startswith("lmms-talo gpu_check") and "CPU smoke run" in line for line in lines)
