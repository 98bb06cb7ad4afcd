"""What a training checkpoint holds besides weights: generator states that load without pickle."""

import io
import random

import numpy as np
import torch

from splatclip.pipelines.train import rng_state, set_rng_state


def test_rng_state_round_trips_through_a_weights_only_load():
    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's state
    buf = io.BytesIO()
    torch.save({"rng": rng_state()}, buf)
    want = (torch.rand(3), np.random.rand(3), np.random.standard_normal(), random.random())
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    set_rng_state(torch.load(io.BytesIO(buf.getvalue()), weights_only=True)["rng"])
    got = (torch.rand(3), np.random.rand(3), np.random.standard_normal(), random.random())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2:] == got[2:]
