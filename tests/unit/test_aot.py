"""The CPU renderer's kernels compiled ahead of time: the same values and gradients as the eager math,
built once per machine (a later process loads, a damaged package is rebuilt, concurrent builders
build once), and the eager path with one warning where they cannot be built."""

import logging
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch

from splatclip.cuda import aot, render
from splatclip.cuda.binning import bin_gaussians
from tests_helpers import random_splats


@pytest.fixture
def kernels():
    built = aot.load()
    assert built is not None, "the compiled kernels did not build on this machine"
    return built


@pytest.fixture
def fresh_root(tmp_path, monkeypatch):
    """An empty kernel cache for one test, and load() forgetting what it loaded before."""
    monkeypatch.setenv("SPLATCLIP_KERNELS", str(tmp_path / "kernels"))
    aot.load.cache_clear()
    yield tmp_path / "kernels"
    aot.load.cache_clear()


@pytest.mark.parametrize("B,N,H,W", [(2, 300, 40, 56), (3, 200, 64, 48), (1, 1, 8, 8), (1, 1, 16, 16), (2, 5, 5, 70)])
def test_compiled_kernels_match_eager_values_and_gradients(kernels, B, N, H, W):
    p = random_splats(B, N, seed=B * 100 + N, dtype=torch.float32).requires_grad_()
    eager = render(p, H, W, backend="torch")
    fused = render(p, H, W, backend="torch", compile=True)
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-5)
    up = torch.randn(eager.shape, generator=torch.Generator().manual_seed(3))
    g1, = torch.autograd.grad((eager * up).sum(), p)
    g2, = torch.autograd.grad((fused * up).sum(), p)
    torch.testing.assert_close(g2, g1, rtol=1e-3, atol=1e-4 * g1.abs().max().item())


@pytest.mark.parametrize("tile", [8, 16])
def test_compiled_binning_keeps_the_pairs_eager_binning_keeps(kernels, tile):
    p = random_splats(3, 400, seed=tile, dtype=torch.float32)
    mask = torch.rand(3, 400, generator=torch.Generator().manual_seed(4)) > 0.1
    eager = bin_gaussians(p, 61, 75, mask, tile=tile)
    fused = bin_gaussians(p, 61, 75, mask, tile=tile, compiled=True)
    assert len(eager.key) > 1000
    for a, b in zip(eager, fused):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def test_small_and_double_inputs_take_the_eager_path(kernels):
    cols = torch.rand(8, 1)
    assert not aot.applies(cols, 5)  # one pair
    assert not aot.applies(torch.rand(8, 10), 1)  # one tile
    assert not aot.applies(torch.rand(8, 10, dtype=torch.float64), 10)
    assert aot.applies(torch.rand(8, 10), 10)


def test_a_later_process_loads_the_package_without_building(kernels):
    package = aot.package_dir()
    stamps = {f.name: f.stat().st_mtime_ns for f in package.iterdir()}
    code = ("import logging, sys; logging.basicConfig(stream=sys.stdout); "
            "from splatclip.cuda import aot; print('loaded', aot.load() is not None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "loaded True" in out and "compiling" not in out
    assert {f.name: f.stat().st_mtime_ns for f in package.iterdir()} == stamps


def copy_build(into):
    """A stand-in for aot.build that copies this machine's built package (a real build takes 30-60 s)."""
    def build(directory):
        calls.append(directory)
        shutil.copytree(into, directory, dirs_exist_ok=True)
    calls = []
    return build, calls


def test_a_damaged_package_is_rebuilt(kernels, fresh_root, monkeypatch):
    monkeypatch.delenv("SPLATCLIP_KERNELS")
    source = aot.package_dir()
    monkeypatch.setenv("SPLATCLIP_KERNELS", str(fresh_root))
    target = aot.package_dir()
    shutil.copytree(source, target)
    (target / f"{aot.NAMES[-1]}.pt2").write_bytes(b"not a package")
    build, calls = copy_build(source)
    monkeypatch.setattr(aot, "build", build)
    loaded = aot.load()
    assert loaded is not None and len(calls) == 1
    assert (target / f"{aot.NAMES[-1]}.pt2").read_bytes() == (source / f"{aot.NAMES[-1]}.pt2").read_bytes()
    assert not [p for p in fresh_root.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_builders_started_together_build_once(kernels, fresh_root, monkeypatch):
    monkeypatch.delenv("SPLATCLIP_KERNELS")
    source = aot.package_dir()
    monkeypatch.setenv("SPLATCLIP_KERNELS", str(fresh_root))
    build, calls = copy_build(source)
    asked = threading.Semaphore(0)
    real_flock = aot.fcntl.flock

    def flock(fd, op):  # counts each builder asking for the lock, then blocks as flock does
        asked.release()
        return real_flock(fd, op)

    def build_when_both_asked(directory):
        assert asked.acquire(timeout=60) and asked.acquire(timeout=60)  # both builders are at the lock
        build(directory)

    monkeypatch.setattr(aot.fcntl, "flock", flock)
    monkeypatch.setattr(aot, "build", build_when_both_asked)
    threads = [threading.Thread(target=aot._build_locked, args=(aot.package_dir(),)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(calls) == 1 and aot._built(aot.package_dir())


def test_without_a_compiler_the_renderer_runs_eagerly_with_one_warning(fresh_root, monkeypatch, caplog):
    def no_compiler(directory):
        raise RuntimeError("g++: command not found\nmore detail")

    monkeypatch.setattr(aot, "build", no_compiler)
    p = random_splats(2, 50, seed=5, dtype=torch.float32).requires_grad_()
    with caplog.at_level(logging.WARNING, logger="splatclip.cuda.aot"):
        first = render(p, 32, 32, backend="torch", compile=True)
        render(p, 32, 32, backend="torch", compile=True).sum().backward()
    torch.testing.assert_close(first, render(p, 32, 32, backend="torch"))
    warnings = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "g++: command not found" in warnings[0] and "more detail" not in warnings[0]
    assert not os.listdir(fresh_root) or not aot._built(aot.package_dir())
