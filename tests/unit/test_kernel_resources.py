"""The Triton kernels fit the register file: compiled ahead of time for sm_80 and sm_90 on this
machine (no GPU), every kernel within the register budget and with no spills."""

import json
import os
import subprocess
import sys

from splatclip.cuda.kernel_resources import ARCHS, REGISTER_BUDGET, occupancy, table
from splatclip.cuda.triton_kernels import KERNELS


def test_every_kernel_compiles_for_sm80_and_sm90_within_budget_without_spills():
    # The suite runs Triton's interpreter (conftest.py); compilation needs a process without it.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "splatclip.cuda.kernel_resources", "--json"], env=env,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout)
    print("\n" + table(rows))
    assert {(r["kernel"], r["arch"]) for r in rows} == {(k, f"sm_{a}") for k in KERNELS for a in ARCHS}
    for r in rows:
        assert 0 < r["registers"] <= REGISTER_BUDGET, r
        assert r["stack"] == 0, f"{r['kernel']} spills {r['stack']} bytes per thread on {r['arch']}"
        assert r["warps"] == KERNELS[r["kernel"]].warps and r["blocks_per_sm"] >= 2, r


def test_occupancy_from_registers_warps_and_shared_memory():
    assert occupancy(255, 4, 0, 90) == (2, 0.125)  # the first backward: two blocks of 4 warps
    assert occupancy(64, 8, 0, 90) == (4, 0.5)
    assert occupancy(101, 8, 1024, 90) == (2, 0.25)  # 104 registers x 32 -> 13 units of 256 a warp
    assert occupancy(32, 4, 0, 80) == (16, 1.0)  # capped by the SM's 64 warps
    assert occupancy(32, 1, 96 * 1024, 80) == (1, 1 / 64)  # capped by shared memory
