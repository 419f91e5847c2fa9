"""The emulated chip equals the edgeprop e-prop reference on real clips.

fp32 storage: bit for bit with EpropLearner(kernel="numba") (same operation order:
sequential sums over inputs and over spikes in ascending id), and within 1e-5
relative of EpropLearner(kernel="numpy") (BLAS sums in another order), for outputs,
spikes and weights after training. Multi-process mode (PE groups in worker processes
over ZeroMQ) gives the same bits as single-process mode.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgeprop.eprop import EpropLearner
from edgeprop.network import ModelConfig, init_params
from firmware_model import EmulatedLearner


@pytest.fixture(scope="module")
def clips(data_dir):
    """Three real clips -> per-channel standardised log-mel + delta features (T=100, 80)."""
    from edgeprop.datasets import load_clip, scan_speech_commands
    from edgeprop.frontend import FrontendConfig, features

    scan = scan_speech_commands(data_dir)
    chosen = sorted(scan.clips, key=lambda c: c.key)[::997][:3]
    audio = np.stack([load_clip(c) for c in chosen])
    f = features(audio, FrontendConfig())
    f = (f - f.mean(axis=(0, 1))) / (f.std(axis=(0, 1)) + 1e-6)
    return f.astype(np.float32), [c.label_index for c in chosen]


def _train(learner, xs, labels, per_step=False):
    ys = []
    for x, lab in zip(xs, labels, strict=True):
        learner.reset()
        for t in range(x.shape[0]):
            ys.append(learner.step(x[t], lab if per_step and t % 3 else None))
        learner.end_sample(None if per_step else lab)
        learner.apply()
    return np.array(ys)


def _arrays(params):
    return params.w_in, params.w_rec, params.w_out


@pytest.mark.parametrize("loss", ["mean", "per_step"])
def test_fp32_emulator_is_bit_exact_with_numba_reference(clips, loss):
    xs, labels = clips
    cfg = ModelConfig()
    p = init_params(cfg, 3)
    ref = EpropLearner(cfg, p.copy(), loss=loss, reg_coef=0.05, kernel="numba")
    emu = EmulatedLearner(cfg, p.copy(), loss=loss, reg_coef=0.05, precision="fp32")
    y_ref = _train(ref, xs, labels, per_step=loss == "per_step")
    y_emu = _train(emu, xs, labels, per_step=loss == "per_step")
    assert np.abs(y_ref).sum() > 0, "the readout never moved: the test would prove nothing"
    assert np.array_equal(y_ref, y_emu)
    for a, b in zip(_arrays(ref.params), _arrays(emu.params), strict=True):
        assert np.array_equal(a, b)
    assert not np.array_equal(ref.params.w_in, p.w_in), "training changed no weight"
    st_ref, st_emu = ref.optimizer_state(), emu.optimizer_state()
    for k in ("m.0", "m.1", "m.2", "v.0", "v.1", "v.2"):
        assert np.array_equal(st_ref[k], st_emu[k]), k


def test_fp32_spikes_and_grads_bit_exact_per_step_of_a_clip(clips):
    xs, labels = clips
    cfg = ModelConfig()
    p = init_params(cfg, 5)
    ref = EpropLearner(cfg, p.copy(), kernel="numba")
    emu = EmulatedLearner(cfg, p.copy(), precision="fp32")
    spikes = 0
    for t in range(xs.shape[1]):
        ref.step(xs[0, t])
        emu.step(xs[0, t])
        # spikes as the host sees them: the readout PE's received spike vector
        z_emu = emu._exec.programs[emu.readout_pe].zin.astype(np.float32)
        assert np.array_equal(ref.state.z, z_emu), f"step {t}"
        spikes += int(z_emu.sum())
    assert spikes > 0
    assert ref.end_sample(labels[0]) == emu.end_sample(labels[0])
    for a, b in zip(ref.grads().arrays(), emu.grads().arrays(), strict=True):
        assert np.array_equal(a, b)


def test_fp32_emulator_within_1e5_of_numpy_reference(clips):
    xs, labels = clips
    cfg = ModelConfig()
    p = init_params(cfg, 3)
    ref = EpropLearner(cfg, p.copy(), kernel="numpy")
    emu = EmulatedLearner(cfg, p.copy(), precision="fp32")
    y_ref = _train(ref, xs[:1, :40], labels[:1])
    y_emu = _train(emu, xs[:1, :40], labels[:1])
    np.testing.assert_allclose(y_emu, y_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(_arrays(ref.params), _arrays(emu.params), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("precision", ["fp32", "int8w-v8"])
def test_multiprocess_equals_single_process_and_reference(clips, precision):
    xs, labels = clips
    cfg = ModelConfig()
    p = init_params(cfg, 1)
    single = EmulatedLearner(cfg, p.copy(), precision=precision)
    multi = EmulatedLearner(cfg, p.copy(), precision=precision, multiprocess=True)
    procs = list(multi._exec.procs)
    try:
        assert len(procs) == 3 and all(pr.poll() is None for pr in procs)
        y_s = _train(single, xs[:2, :50], labels[:2])
        y_m = _train(multi, xs[:2, :50], labels[:2])
        assert np.array_equal(y_s, y_m)
        for a, b in zip(_arrays(single.params), _arrays(multi.params), strict=True):
            assert np.array_equal(a, b)
        if precision == "fp32":  # and both equal the reference, bit for bit
            ref = EpropLearner(cfg, p.copy(), kernel="numba")
            assert np.array_equal(_train(ref, xs[:2, :50], labels[:2]), y_m)
            for a, b in zip(_arrays(ref.params), _arrays(multi.params), strict=True):
                assert np.array_equal(a, b)
        ps, pm = single.profile(), multi.profile()
        for k in ("memory_total_bytes", "step_time_us", "packets_per_step",
                  "energy_per_sample_uj"):
            assert ps[k] == pm[k], k
    finally:
        multi.close()
    assert all(pr.poll() is not None for pr in procs), "close() left workers running"


@pytest.mark.parametrize("neuron,feedback,loss,optimizer", [
    ("alif", "random", "mean", "adam"), ("lif", "symmetric", "per_step", "momentum"),
    ("alif", "symmetric", "per_step", "sgd")])
def test_bit_exact_across_configs_with_minibatch(neuron, feedback, loss, optimizer):
    """Three samples accumulated before one apply (the mean loss's second buffer)."""
    cfg = ModelConfig(neuron=neuron, feedback=feedback)
    rng = np.random.default_rng(7)
    xs = (rng.random((3, 40, cfg.n_in)) < 0.15).astype(np.float32)
    p = init_params(cfg, 2)
    ref = EpropLearner(cfg, p.copy(), loss=loss, optimizer=optimizer, reg_coef=0.1)
    emu = EmulatedLearner(cfg, p.copy(), loss=loss, optimizer=optimizer, reg_coef=0.1,
                          precision="fp32", n_pes=8)
    for x in xs:
        assert ref.train_sample(x, 2)[0] == emu.train_sample(x, 2)[0]
    for a, b in zip(ref.grads().arrays(), emu.grads().arrays(), strict=True):
        assert np.array_equal(a, b)
    ref.apply()
    emu.apply()
    for a, b in zip(_arrays(ref.params), _arrays(emu.params), strict=True):
        assert np.array_equal(a, b)
    so, se = ref.optimizer_state(), emu.optimizer_state()
    assert sorted(so) == sorted(se)
    for k in so:
        assert np.array_equal(so[k], se[k]), k


def test_optimizer_state_round_trips_through_the_pes():
    cfg = ModelConfig()
    p = init_params(cfg, 4)
    x = (np.random.default_rng(8).random((30, cfg.n_in)) < 0.2).astype(np.float32)
    a = EmulatedLearner(cfg, p.copy(), precision="fp32")
    a.train_sample(x, 1)
    a.apply()
    b = EmulatedLearner(cfg, a.params, precision="fp32")
    b.load_optimizer_state(a.optimizer_state())
    for lrn in (a, b):
        lrn.train_sample(x, 2)
        lrn.apply()
    for u, v in zip(_arrays(a.params), _arrays(b.params), strict=True):
        assert np.array_equal(u, v)


def test_both_backends_refuse_another_optimizers_state_and_keep_their_own_rate():
    """The reference took the state's lr (serve --lr was ignored on resume) while the PEs
    kept theirs; and a plain-SGD learner took an Adam or momentum state without a word."""
    from edgeprop.errors import CheckpointError

    cfg = ModelConfig()
    p = init_params(cfg, 4)
    x = (np.random.default_rng(8).random((30, cfg.n_in)) < 0.2).astype(np.float32)
    states = {}
    for opt in ("adam", "momentum", "sgd"):
        lrn = EpropLearner(cfg, p.copy(), optimizer=opt, lr=1e-3)
        lrn.train_sample(x, 1)
        lrn.apply()
        states[opt] = lrn.optimizer_state()
    for make in (lambda o, lr: EpropLearner(cfg, p.copy(), optimizer=o, lr=lr),
                 lambda o, lr: EmulatedLearner(cfg, p.copy(), optimizer=o, lr=lr,
                                               precision="fp32", n_pes=12)):
        for mine in states:
            for theirs, state in states.items():
                lrn = make(mine, 1e-6)
                if mine == theirs:
                    lrn.load_optimizer_state(state)
                    assert lrn.optimizer_state()["lr"] == 1e-6  # the rate asked for
                else:
                    with pytest.raises(CheckpointError, match="optimizer state is for"):
                        lrn.load_optimizer_state(state)


def test_load_params_writes_weights_into_the_pes_and_keeps_optimizer_state():
    cfg = ModelConfig()
    emu = EmulatedLearner(cfg, init_params(cfg, 0), precision="fp32")
    x = (np.random.default_rng(9).random((20, cfg.n_in)) < 0.2).astype(np.float32)
    emu.train_sample(x, 1)
    emu.apply()
    m_before = emu.optimizer_state()["m.0"]
    new = init_params(cfg, 1)
    emu.load_params(new)
    for a, b in zip(_arrays(new), _arrays(emu.params), strict=True):
        assert np.array_equal(a, b)
    assert np.array_equal(emu.optimizer_state()["m.0"], m_before)
    assert np.abs(m_before).sum() > 0


@pytest.mark.parametrize("precision", ["int8w-v8", "fp32"])
def test_train_sample_in_one_call_equals_stepping_frame_by_frame(clips, precision):
    """train_sample's one-kernel path (mean loss) against reset + step() x T + end_sample:
    the same losses, logits, weights, optimizer state, neuron state, received-spike
    buffers, per-PE counters and every profile figure."""
    xs, labels = clips
    cfg = ModelConfig()
    p = init_params(cfg, 6)
    fast = EmulatedLearner(cfg, p.copy(), precision=precision, lr=3e-3)
    slow = EmulatedLearner(cfg, p.copy(), precision=precision, lr=3e-3)
    assert fast.trains_in_one_call, "the one-call path is not in use"
    for i, (x, lab) in enumerate(zip(list(xs) * 2, labels * 2, strict=True)):
        loss_f, logits_f = fast.train_sample(x, lab)
        slow.reset()
        for t in range(x.shape[0]):
            slow.step(x[t])
        assert loss_f == slow.end_sample(lab)
        assert np.array_equal(logits_f, slow.last_logits)
        if i % 2:
            fast.apply()
            slow.apply()
    for a, b in zip(_arrays(fast.params), _arrays(slow.params), strict=True):
        assert np.array_equal(a, b)
    assert not np.array_equal(fast.params.w_rec, p.w_rec), "training changed no weight"
    so, ss = fast.optimizer_state(), slow.optimizer_state()
    assert all(np.array_equal(so[k], ss[k]) for k in so)
    for k in ("v", "a", "z", "y"):
        assert np.array_equal(getattr(fast.state, k), getattr(slow.state, k)), k
    for pf, ps in zip(fast._exec.programs.values(), slow._exec.programs.values(), strict=True):
        assert np.array_equal(pf.zin, ps.zin)
        assert vars(pf.pe.counters) == vars(ps.pe.counters)
        assert pf._mark == ps._mark
    prof_f, prof_s = fast.profile(), slow.profile()
    prof_f.pop("emulator_wall_s_per_step")
    prof_s.pop("emulator_wall_s_per_step")
    assert prof_f["packets_by_kind"]["spike"] > 0
    assert prof_f == prof_s
