"""What the Triton kernels cost the hardware, found ahead of time on any machine (no GPU needed).

Each kernel of `triton_kernels.KERNELS` is compiled with its own launch settings for an NVIDIA
target (`triton.compile` with a `GPUTarget`); the cubin's resource usage is read with the
`cuobjdump` that ships in Triton's wheel: registers per thread, the local-memory stack frame
(where spilled registers go; 0 means no spills) and static shared memory. From those and the SM's
limits follows the occupancy: resident blocks and warps per SM.

    python -m splatclip.cuda.kernel_resources          # the table
    python -m splatclip.cuda.kernel_resources --json   # the same figures, one JSON list

Triton's interpreter (TRITON_INTERPRET=1) replaces every kernel by a Python function, so this runs
in a process without it (the test suite starts one).
"""

import argparse
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

ARCHS = (80, 90)  # sm_80 (A100), sm_90 (H100, H200)
REGISTER_BUDGET = 128  # per thread: at 8 warps a block, 2+ blocks (16+ warps) per SM
# Per SM on sm_80 and sm_90: 64K 32-bit registers, 64 resident warps, 32 resident blocks; registers
# are allocated per warp in units of 256. Shared memory per SM: 164 KB (A100), 228 KB (H100).
REGISTERS_PER_SM, WARPS_PER_SM, BLOCKS_PER_SM, REGISTER_UNIT = 65536, 64, 32, 256
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}


def _cuobjdump() -> Path:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise RuntimeError(f"no cuobjdump at {path}: this Triton wheel does not ship NVIDIA's tools")
    return path


def compile_kernel(name: str, arch: int):
    """The kernel `name` of KERNELS compiled for sm_<arch> with its launch's constants and warps."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("ahead-of-time compilation needs real Triton kernels: unset TRITON_INTERPRET")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from splatclip.cuda.triton_kernels import KERNELS

    kernel = KERNELS[name]
    signature = {**kernel.signature, **{k: "constexpr" for k in kernel.constexprs}}
    source = ASTSource(fn=kernel.fn, signature=signature, constexprs=kernel.constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": kernel.warps})


def cubin_usage(cubin: bytes) -> dict:
    """{'registers', 'stack', 'shared'} of the one function in a cubin, per cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run([str(_cuobjdump()), "--dump-resource-usage", f.name], capture_output=True,
                                text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", report))
    if "REG" not in fields:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{report}")
    return {"registers": int(fields["REG"]), "stack": int(fields["STACK"]) + int(fields.get("LOCAL", 0)),
            "shared": int(fields.get("SHARED", 0))}


def occupancy(registers: int, warps: int, shared: int, arch: int) -> tuple[int, float]:
    """(resident blocks per SM, fraction of the SM's warps) for blocks of `warps` warps."""
    per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    by_registers = (REGISTERS_PER_SM // per_warp) // warps
    by_shared = SHARED_PER_SM[arch] // shared if shared else BLOCKS_PER_SM
    blocks = min(by_registers, WARPS_PER_SM // warps, by_shared, BLOCKS_PER_SM)
    return blocks, blocks * warps / WARPS_PER_SM


def resources() -> list[dict]:
    """One row per (kernel, target): launch settings, compiled usage, occupancy."""
    from splatclip.cuda.triton_kernels import KERNELS

    rows = []
    for name, kernel in KERNELS.items():
        for arch in ARCHS:
            compiled = compile_kernel(name, arch)
            usage = cubin_usage(compiled.asm["cubin"])
            blocks, fraction = occupancy(usage["registers"], kernel.warps, usage["shared"], arch)
            rows.append({"kernel": name, "arch": f"sm_{arch}", "chunk": kernel.chunk, "warps": kernel.warps,
                         **usage, "blocks_per_sm": blocks, "occupancy": round(fraction, 3)})
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'kernel':<11} {'target':<6} {'chunk':>5} {'warps':>5} {'registers':>9} {'spill B':>7} "
             f"{'smem B':>6} {'blocks/SM':>9} {'occupancy':>9}"]
    for r in rows:
        lines.append(f"{r['kernel']:<11} {r['arch']:<6} {r['chunk']:>5} {r['warps']:>5} {r['registers']:>9} "
                     f"{r['stack']:>7} {r['shared']:>6} {r['blocks_per_sm']:>9} {r['occupancy']:>9.2f}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    rows = resources()
    print(json.dumps(rows) if ap.parse_args().json else table(rows))


if __name__ == "__main__":
    main()
