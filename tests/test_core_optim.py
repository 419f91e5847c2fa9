"""Optimizers: Adam and SGD match their textbook updates; state round-trips."""

from __future__ import annotations

import numpy as np
import pytest

from edgeprop.errors import CheckpointError, ConfigError
from edgeprop.optim import SGD, Adam, make_optimizer


def test_adam_matches_textbook_update_in_float64():
    rng = np.random.default_rng(0)
    p = rng.standard_normal((3, 4)).astype(np.float32)
    ref = p.astype(np.float64)
    m = np.zeros_like(ref)
    v = np.zeros_like(ref)
    opt = Adam(lr=0.01, betas=(0.9, 0.99), eps=1e-8)
    for t in range(1, 6):
        g = rng.standard_normal((3, 4)).astype(np.float32)
        opt.step([p], [g])
        m = 0.9 * m + 0.1 * g
        v = 0.99 * v + 0.01 * g.astype(np.float64) ** 2
        ref -= 0.01 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.99**t)) + 1e-8)
    np.testing.assert_allclose(p, ref, rtol=1e-5, atol=1e-6)
    assert p.dtype == np.float32


def test_sgd_and_momentum():
    p = np.ones(3, np.float32)
    SGD(lr=0.5).step([p], [np.full(3, 2.0, np.float32)])
    np.testing.assert_array_equal(p, 0.0)
    q = np.zeros(2, np.float32)
    opt = SGD(lr=1.0, momentum=0.5)
    for _ in range(2):
        opt.step([q], [np.ones(2, np.float32)])
    np.testing.assert_allclose(q, -(1.0 + 1.5))


def test_state_dict_round_trip_and_mismatch_errors():
    opt = Adam(lr=0.1)
    p = [np.zeros((2, 2), np.float32)]
    opt.step(p, [np.ones((2, 2), np.float32)])
    d = opt.state_dict()
    other = Adam(lr=0.02)
    other.load_state_dict(d)
    assert other.t == 1 and other.lr == 0.02  # the rate it was made with, not the state's
    np.testing.assert_array_equal(other.bufs["m"][0], opt.bufs["m"][0])
    with pytest.raises(CheckpointError, match="another optimizer"):
        SGD(momentum=0.9).load_state_dict(d)
    with pytest.raises(CheckpointError, match="for b1 = 0.9, this optimizer has b1 = 0.5"):
        Adam(betas=(0.5, 0.999)).load_state_dict(d)
    # plain SGD and momentum SGD share a kind; their momentum tells them apart
    heavy = SGD(lr=0.1, momentum=0.9)
    heavy.step(p, [np.ones((2, 2), np.float32)])
    for a, b in ((heavy, SGD(lr=0.1)), (SGD(lr=0.1), SGD(lr=0.1, momentum=0.9))):
        with pytest.raises(CheckpointError, match="for momentum = "):
            b.load_state_dict(a.state_dict())
    wrong = Adam()
    wrong.init_state([(3, 3)])
    with pytest.raises(CheckpointError, match="do not match"):
        wrong.load_state_dict(d)
    with pytest.raises(ConfigError):
        make_optimizer("rmsprop", 0.1)
    with pytest.raises(ConfigError):
        opt.step(p, [np.ones((3, 2), np.float32)])
