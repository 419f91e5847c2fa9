"""Checkpoints round-trip exactly; every bad file gives a CheckpointError naming it."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edgeprop.checkpoint import (
    FORMAT_VERSION,
    load_checkpoint,
    params_hash,
    save_checkpoint,
)
from edgeprop.errors import CheckpointError
from edgeprop.network import ModelConfig, init_params
from edgeprop.optim import Adam

CFG = ModelConfig(n_in=6, n_rec=9, n_out=4)


def _trained_adam(params):
    opt = Adam(lr=1e-2)
    rng = np.random.default_rng(0)
    ws = [params.w_in, params.w_rec, params.w_out]
    for _ in range(3):
        opt.step(ws, [rng.standard_normal(w.shape).astype(np.float32) for w in ws])
    return opt


def _save(path, **kw):
    p = init_params(CFG, seed=3)
    save_checkpoint(path, CFG, p, **kw)
    return p


def test_checkpoint_round_trips_weights_optimizer_and_configs_exactly(tmp_path):
    p = init_params(CFG, seed=3)
    opt = _trained_adam(p)
    front = {"n_mels": 40, "fmin": 20.0, "window": np.hanning(8).astype(np.float32)}
    enc = {"kind": "threshold", "thresholds": np.arange(6, dtype=np.float64),
           "nested": {"a": [1, 2]}}
    path = tmp_path / "m.ckpt"
    save_checkpoint(path, CFG, p, optimizer_state=opt.state_dict(), frontend=front,
                    encoder=enc, labels=["yes", "no"], extra={"step": 7, "note": "x"})
    ck = load_checkpoint(path, expect=CFG)
    assert ck.cfg == CFG and ck.format_version == FORMAT_VERSION
    for a, b in zip(p.arrays(), ck.params.arrays(), strict=True):
        assert a.dtype == b.dtype == np.float32
        np.testing.assert_array_equal(a, b)
    assert params_hash(ck.params) == params_hash(p)
    opt2 = Adam(lr=0.5)
    opt2.load_state_dict(ck.optimizer_state)
    assert opt2.t == opt.t == 3 and opt2.lr == opt.lr
    for slot in ("m", "v"):
        for a, b in zip(opt.bufs[slot], opt2.bufs[slot], strict=True):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ck.frontend["window"], front["window"])
    assert ck.frontend["n_mels"] == 40 and ck.frontend["fmin"] == 20.0
    np.testing.assert_array_equal(ck.encoder["thresholds"], enc["thresholds"])
    assert ck.encoder["thresholds"].dtype == np.float64
    assert ck.encoder["nested"] == {"a": [1, 2]}
    assert ck.labels == ["yes", "no"] and ck.extra == {"step": 7, "note": "x"}
    # continuing from the restored optimizer gives the identical next update
    g = [np.full(w.shape, 0.1, np.float32) for w in (p.w_in, p.w_rec, p.w_out)]
    q = ck.params
    opt.step([p.w_in, p.w_rec, p.w_out], g)
    opt2.step([q.w_in, q.w_rec, q.w_out], g)
    np.testing.assert_array_equal(p.w_in, q.w_in)


def test_params_hash_is_stable_and_sensitive():
    p = init_params(CFG, seed=3)
    assert params_hash(p) == params_hash(init_params(CFG, seed=3))
    q = p.copy()
    q.w_out[0, 0] = np.nextafter(q.w_out[0, 0], np.float32(9))
    assert params_hash(q) != params_hash(p)


def _raises(path, match, **kw):
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path, **kw)


def test_missing_checkpoint(tmp_path):
    _raises(tmp_path / "nope.ckpt", "not found")
    _raises(tmp_path, "folder")


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "m.ckpt"
    _save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _raises(path, "corrupt or truncated")


def test_bitflipped_weights_are_detected(tmp_path):
    path = tmp_path / "m.ckpt"
    _save(path)
    data = bytearray(path.read_bytes())
    i = data.find(b"params/w_rec.npy")  # local header; the array payload follows
    j = i + 400
    data[j] ^= 0xFF
    path.write_bytes(bytes(data))
    _raises(path, "corrupt")


def test_garbage_and_empty_files(tmp_path):
    path = tmp_path / "g.ckpt"
    path.write_bytes(np.random.default_rng(0).bytes(1000))
    _raises(path, "not an edgeprop checkpoint")
    path.write_bytes(b"")
    _raises(path, "not an edgeprop checkpoint")


def test_other_npz_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "o.npz"
    np.savez(path, a=np.zeros(3))
    _raises(path, "not an edgeprop checkpoint")


def _rewrite(path, edit_meta=None, edit_arrays=None):
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    meta = json.loads(members.pop("meta.json"))
    if edit_meta:
        edit_meta(meta)
    if edit_arrays:
        edit_arrays(members)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("meta.json", json.dumps(meta))
        for n, b in members.items():
            zf.writestr(n, b)


def test_future_format_version(tmp_path):
    path = tmp_path / "m.ckpt"
    _save(path)
    _rewrite(path, edit_meta=lambda m: m.update(format_version=FORMAT_VERSION + 1))
    _raises(path, "newer than this edgeprop reads")


def test_wrong_model_shape_via_expect(tmp_path):
    path = tmp_path / "m.ckpt"
    _save(path)
    other = ModelConfig(n_in=6, n_rec=10, n_out=4)
    _raises(path, r"another model: n_rec=9 \(expected 10\)", expect=other)


def test_wrong_array_shape_and_dtype(tmp_path):
    path = tmp_path / "m.ckpt"
    _save(path)

    def swap(members, arr):
        import io

        buf = io.BytesIO()
        np.save(buf, arr)
        members["params/w_rec.npy"] = buf.getvalue()

    _rewrite(path, edit_arrays=lambda m: swap(m, np.zeros((9, 8), np.float32)))
    _raises(path, r"w_rec has shape \(9, 8\)")
    _rewrite(path, edit_arrays=lambda m: swap(m, np.zeros((9, 9), np.float64)))
    _raises(path, "dtype float64")
    bad = np.zeros((9, 9), np.float32)
    bad[1, 2] = np.nan
    _rewrite(path, edit_arrays=lambda m: swap(m, bad))
    _raises(path, "NaN")


def test_invalid_model_config_in_file(tmp_path):
    path = tmp_path / "m.ckpt"
    _save(path)
    _rewrite(path, edit_meta=lambda m: m["model"].update(neuron="izhikevich"))
    _raises(path, "invalid model config")


@pytest.mark.parametrize("edit, what", [
    (lambda m: m["model"].update(n_in="abc"), "invalid model config"),
    (lambda m: m.update(labels=5), "labels is a int, not a list"),
    (lambda m: m.update(encoder="abc"), "encoder is a str, not a dict"),
    (lambda m: m.update(extra=[1, 2]), "extra is a list, not a dict"),
])
def test_hand_edited_meta_is_a_checkpoint_error(tmp_path, edit, what):
    path = tmp_path / "m.ckpt"
    _save(path)
    _rewrite(path, edit_meta=edit)
    _raises(path, what)


def test_failed_write_leaves_old_checkpoint_intact(tmp_path):
    """A real failing write (file-size limit, as on a full disk) in a subprocess."""
    path = tmp_path / "m.ckpt"
    old = _save(path)
    before = path.read_bytes()
    code = f"""
import resource, signal
import numpy as np
from edgeprop.checkpoint import save_checkpoint
from edgeprop.errors import CheckpointError
from edgeprop.network import ModelConfig, init_params
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
cfg = ModelConfig(n_in=200, n_rec=100, n_out=4)
try:
    save_checkpoint({str(path)!r}, cfg, init_params(cfg, seed=0))
except CheckpointError as exc:
    print("CheckpointError:", exc)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "CheckpointError: cannot write checkpoint" in r.stdout, r.stdout + r.stderr
    assert path.read_bytes() == before
    assert params_hash(load_checkpoint(path).params) == params_hash(old)
    assert [f.name for f in Path(tmp_path).iterdir()] == ["m.ckpt"]  # no temp file left
