"""Chip model, mapping and router: overflow is an error, routing delivers exactly once."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeprop.errors import EdgepropError
from edgeprop.network import ModelConfig, init_params
from firmware_model import Chip, EmulatedLearner, MappingError, SramOverflowError, map_network
from firmware_model.chip import PE_SRAM_BYTES, Sram
from firmware_model.router import (
    HOST_ID,
    INPUT,
    LSIG,
    OUTPUT,
    SPIKE,
    Router,
    RoutingError,
    aligned_blocks,
    make_key,
)


def test_sram_overflow_names_pe_and_region():
    s = Sram(7)
    s.alloc("weights", "w", (PE_SRAM_BYTES // 4 - 8,), np.float32)
    with pytest.raises(SramOverflowError, match=r"PE 7 .*'eligibility'"):
        s.alloc("eligibility", "ebar", (64,), np.float32)


def test_fp32_on_one_pe_is_rejected_with_a_clear_message():
    cfg = ModelConfig()
    with pytest.raises(SramOverflowError) as exc:
        EmulatedLearner(cfg, init_params(cfg, 0), n_pes=1, precision="fp32")
    assert isinstance(exc.value, EdgepropError)
    assert "PE 0" in str(exc.value) and "--pes" in str(exc.value)


def test_too_many_pes_or_bad_clock_rejected():
    cfg = ModelConfig()
    with pytest.raises(MappingError, match="at least one neuron"):
        map_network(cfg, cfg.n_rec + 1)
    with pytest.raises(MappingError):
        Chip(0)
    with pytest.raises(MappingError):
        Chip(12, clock_mhz=500)


def test_router_table_is_bounded():
    cfg = ModelConfig()
    with pytest.raises(RoutingError, match="table full"):
        map_network(cfg, 12, max_table_entries=20)


def test_unrouted_packet_is_an_error():
    r = Router(2)
    r.add(make_key(SPIKE, 0), 0xFFFF0000, [1])
    with pytest.raises(RoutingError, match="matches no routing entry"):
        r.lookup(np.array([make_key(SPIKE, 1, 3)], np.uint32))


@given(st.integers(0, 300), st.integers(1, 200))
def test_aligned_blocks_cover_range_exactly(start, size):
    blocks = aligned_blocks(start, start + size)
    covered = [b + i for b, n in blocks for i in range(n)]
    assert covered == list(range(start, start + size))
    assert all(b % n == 0 and n & (n - 1) == 0 for b, n in blocks)


@settings(max_examples=40, deadline=None)
@given(n_rec=st.integers(1, 150), n_pes=st.integers(1, 40), data=st.data())
def test_routing_delivers_every_packet_exactly_once(n_rec, n_pes, data):
    """Random sizes, PE counts and spike patterns: each spike reaches every PE once,
    each learning signal reaches exactly its neuron's owner, outputs reach the host."""
    n_pes = min(n_pes, n_rec)
    cfg = ModelConfig(n_in=data.draw(st.integers(1, 90)), n_rec=n_rec, n_out=12)
    m = map_network(cfg, n_pes)
    spikes = np.array(data.draw(st.lists(st.booleans(), min_size=n_rec, max_size=n_rec)))
    keys = np.concatenate([
        np.asarray(make_key(SPIKE, p, np.flatnonzero(spikes[s:e]) + s), np.uint32)
        for p, (s, e) in enumerate(m.slices)])
    out = m.router.deliver(keys, np.zeros(keys.size, np.uint32))
    for target in range(n_pes):
        got = out[target][0] & 0xFFFF
        assert sorted(got.tolist()) == np.flatnonzero(spikes).tolist()
    assert out[m.router.host][0].size == 0
    # learning signals: one per neuron, only to its owner
    lkeys = np.asarray(make_key(LSIG, m.readout_pe, np.arange(n_rec)), np.uint32)
    out = m.router.deliver(lkeys, np.arange(n_rec, dtype=np.uint32))
    seen = np.zeros(n_rec, int)
    for target in range(n_pes):
        idx = (out[target][0] & 0xFFFF).astype(int)
        s, e = m.slices[target]
        assert ((idx >= s) & (idx < e)).all()
        assert np.array_equal(out[target][1], idx)  # payload travels with its key
        seen[idx] += 1
    assert (seen == 1).all()
    # input frame: every PE gets every channel once; outputs: host only
    ikeys = np.asarray(make_key(INPUT, HOST_ID, np.arange(cfg.n_in)), np.uint32)
    out = m.router.deliver(ikeys, np.zeros(cfg.n_in, np.uint32))
    assert all(out[t][0].size == cfg.n_in for t in range(n_pes))
    okeys = np.asarray(make_key(OUTPUT, m.readout_pe, np.arange(12)), np.uint32)
    out = m.router.deliver(okeys, np.zeros(12, np.uint32))
    assert out[m.router.host][0].size == 12 and all(out[t][0].size == 0 for t in range(n_pes))
    # the lookup cache agrees with matching the table itself
    assert np.array_equal(m.router.route(keys), m.router.lookup(keys))


def test_partition_is_even_and_quads_group_four():
    m = map_network(ModelConfig(), 12)
    assert [e - s for s, e in m.slices] == [10] * 12
    assert Chip(12).qpes() == {0: [0, 1, 2, 3], 1: [4, 5, 6, 7], 2: [8, 9, 10, 11]}
    assert m.placement()[m.readout_pe]["roles"] == ["neurons", "readout"]


def test_the_optimizer_step_is_charged_for_the_buffers_it_keeps():
    """Plain SGD was charged the format costs of Adam's m and v, and momentum the cost of
    plain SGD (its buffer's load, update and store left out)."""
    from firmware_model import costs

    cfg = ModelConfig()
    x = (np.random.default_rng(0).random((20, cfg.n_in)) < 0.2).astype(np.float32)
    per_synapse = {}
    for prec in ("fp32", "int8w-v8", "fp16"):
        for opt in ("sgd", "momentum", "adam"):
            lrn = EmulatedLearner(cfg, init_params(cfg, 3), optimizer=opt, precision=prec)
            lrn.train_sample(x, 1)
            _, cycles = lrn._call("apply", {q: {"scale": 1.0} for q in lrn._all})
            rows = lrn.mapping.slices[0][1] - lrn.mapping.slices[0][0]
            per_synapse[prec, opt] = int(cycles[0]) / (rows * (cfg.n_in + cfg.n_rec))
        assert per_synapse[prec, "sgd"] < per_synapse[prec, "momentum"] < \
            per_synapse[prec, "adam"]
    for opt in ("sgd", "momentum", "adam"):  # fp32: no format work, the kernel's cycles
        assert per_synapse["fp32", opt] == costs.CYCLES[opt]
    assert costs.CYCLES[costs.elig_kernel("lif", True)] < \
        costs.CYCLES[costs.elig_kernel("lif", False)]


@pytest.mark.parametrize("multiprocess", [False, True])
def test_a_precision_of_ones_own_is_taken_as_given(multiprocess):
    """get_precision takes a Precision, but only its name reached the PEs, which looked
    it up again among the named variants: 'unknown precision'."""
    from firmware_model.precision import Precision

    cfg = ModelConfig()
    x = (np.random.default_rng(0).random((20, cfg.n_in)) < 0.2).astype(np.float32)
    mine = EmulatedLearner(cfg, init_params(cfg, 3), precision=Precision("mine", traces="fp16"),
                           multiprocess=multiprocess)
    named = EmulatedLearner(cfg, init_params(cfg, 3), precision="fp32")
    try:
        for lrn in (mine, named):
            lrn.train_sample(x, 1)
            lrn.apply()
        # fp16 traces: other gradients than fp32's, so other weights
        assert not np.array_equal(mine.params.w_in, named.params.w_in)
        assert np.isfinite(mine.params.w_in).all()
    finally:
        mine.close()
        named.close()
