"""The training path of sparse BPTT is bit-for-bit frozen.

The shipped model (edgeprop/assets/kws_srnn.npz) was trained with these exact sparse
gradients and `edgeprop pretrain` reproduces it bit for bit, so any speed-up of the
sparse backward must keep `sparse_bptt.loss_and_grads` (the call `training.batch_grads`
makes) bit-identical. The hashes below were recorded with the implementation the
shipped model was trained with (before the 2026-11-24 backward optimisation) on fixed
real-feature batches and fixed synthetic batches; the test recomputes them. When the
model was retrained (2026-11-25, 400 epochs, 16 noise copies; same code) only the two
real batches through the shipped weights were re-recorded: the synthetic batches and
the real batch through fresh weights kept their hashes from before the optimisation.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeprop import sparse_bptt
from edgeprop.network import ModelConfig, init_params

# training settings (TrainConfig defaults): B_th 0.2, reg 0.5 at 0.02 spikes/step, batch 32
TRAIN_KW = dict(b_th=0.2, reg_coef=0.5, target_rate=0.02, warn_silent=False)

SYNTH_HASHES = {
    'init_mean': "b5fe36bb44ce1fcc1e677f774d1a479a33bdf3b195b66d6f89dea32855397475",
    'init_mean_b64': "5f87d1b929212d4774094481d298d5257efe7f3ca113935c7969670e4035c110",
    'init_per_step': "74d4ea220781d5423dbda305df23d4b22a3528e906829cb128e060c0f189e754",
    'lif_wide_band': "5a191adb4d36460a0bfb16f699db7194d0fa7c09021c7fa0a6783c624af325c0",
}
REAL_INPUT_HASHES = {
    0: "5e02497f9bc0628fa1f0c4fa6d817aa94d2e87bea09314537e04f999b445e867",
    1: "f05ee4f2fc059426b555cd68e230cb67950e600eabab2ba3940afa1a78e9daf5",
    2: "dbbf2a48de724118ed8a48718335ab4fb5189c4afacb5214e96f6c0e92786736",
}
SHIPPED_PARAMS_HASH = "7c04dc6a3955e8bc246d03b51c5dd0b958c8d7589df9b06b719982967606497f"
REAL_HASHES = {
    0: "d4fed2a095478aaaf521be6569a151e34cca419389adfa03a0af2b0b4461685b",
    1: "76b07dc8edf0d17fb65761f711091e9e2f081208dc9ad8d15367db94a806c4dd",
    2: "8171870977b4451be172547d8a78ab9e2ccdd47da0320810fc948024ae84f6b3",
}


def _digest(loss: float, grads) -> str:
    h = hashlib.sha256(np.float64(loss).tobytes())
    for g in grads.arrays():
        h.update(np.ascontiguousarray(g).tobytes())
    return h.hexdigest()


def _params_digest(params) -> str:
    h = hashlib.sha256()
    for a in (params.w_in, params.w_rec, params.w_out):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _x_digest(x: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256(np.ascontiguousarray(x, np.float32).tobytes())
    h.update(np.asarray(labels, np.int64).tobytes())
    return h.hexdigest()


def synth_case(name: str):
    """(cfg, params, x (T, B, F), labels, kwargs) of a fixed synthetic case."""
    if name == "lif_wide_band":
        cfg = ModelConfig(neuron="lif")
    else:
        cfg = ModelConfig()
    params = init_params(cfg, 7)
    B = 64 if name == "init_mean_b64" else 32
    rng = np.random.default_rng(11)
    x = (0.8 * rng.standard_normal((100, B, cfg.n_in))).astype(np.float32)
    kw = dict(TRAIN_KW)
    if name == "init_per_step":
        labels = rng.integers(-1, cfg.n_out, (100, B))
        kw["loss"] = "per_step"
    else:
        labels = rng.integers(0, cfg.n_out, B)
    if name == "lif_wide_band":
        kw["b_th"] = 0.7
    return cfg, params, x, labels, kw


def real_case(data_dir, k: int):
    """Batch k (32 clips) of real features through the shipped model's frontend."""
    from edgeprop.datasets import scan_speech_commands
    from edgeprop.evaluation import checkpoint_frontend
    from edgeprop.feature_cache import FeatureCache
    from edgeprop.shipped import load_shipped

    ck = load_shipped()
    clips = scan_speech_commands(data_dir).clips
    pick = np.random.default_rng(100 + k).choice(len(clips), 32, replace=False)
    chosen = [clips[i] for i in sorted(pick)]
    feats = FeatureCache().features(chosen, checkpoint_frontend(ck))
    x = np.ascontiguousarray(feats.transpose(1, 0, 2))
    labels = np.array([c.label_index for c in chosen])
    params = ck.params if k < 2 else init_params(ck.cfg, k)  # trained and fresh weights
    return ck.cfg, params, x, labels, dict(TRAIN_KW)


def grads_digest(case) -> str:
    cfg, params, x, labels, kw = case
    loss, grads, _ = sparse_bptt.loss_and_grads(cfg, params, x, labels, **kw)
    return _digest(loss, grads)


def all_digests(data_dir: str | None) -> dict:
    """Every digest of this file (real batches only when data_dir is given)."""
    out = {"synth": {n: grads_digest(synth_case(n)) for n in sorted(SYNTH_HASHES)},
           "real_x": {}, "real": {}}
    if data_dir is not None:
        from edgeprop.shipped import load_shipped

        out["shipped_params"] = _params_digest(load_shipped().params)
        for k in sorted(REAL_HASHES):
            case = real_case(Path(data_dir), k)
            out["real_x"][k] = _x_digest(case[2], case[3])
            out["real"][k] = grads_digest(case)
    return out


def _digests_one_thread(data_dir: str | None) -> dict:
    """all_digests in a fresh interpreter with single-threaded BLAS, as the documented
    pretrain command runs (OMP_NUM_THREADS=1): the forward's input product x W_in^T sums
    in a different order with more BLAS threads. OpenBLAS's kernel is pinned to its
    Haswell (AVX2) one, which x86_64 machines without AVX-512 pick anyway: on an AVX-512
    CPU OpenBLAS would choose its SkylakeX kernel, whose sums round differently, and
    every hash here would change although the code did not."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               OPENBLAS_CORETYPE="Haswell")
    res = subprocess.run([sys.executable, __file__] + ([str(data_dir)] if data_dir else []),
                         env=env, capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(res.stdout.strip().splitlines()[-1])
    got["real_x"] = {int(k): v for k, v in got["real_x"].items()}
    got["real"] = {int(k): v for k, v in got["real"].items()}
    return got


@pytest.fixture(scope="module")
def synth_digests():
    return _digests_one_thread(None)


@pytest.mark.parametrize("name", sorted(SYNTH_HASHES))
def test_sparse_grads_bit_identical_on_synthetic_batches(synth_digests, name):
    assert synth_digests["synth"][name] == SYNTH_HASHES[name]


def test_sparse_grads_bit_identical_on_real_batches(data_dir):
    got = _digests_one_thread(data_dir)
    assert got["shipped_params"] == SHIPPED_PARAMS_HASH, \
        "the shipped model changed (not the sparse BPTT code): re-record REAL_HASHES"
    assert got["real_x"] == REAL_INPUT_HASHES, \
        "the features changed (frontend/cache/data), not the sparse BPTT code"
    assert got["real"] == REAL_HASHES


if __name__ == "__main__":
    print(json.dumps(all_digests(sys.argv[1] if len(sys.argv) > 1 else None)))
