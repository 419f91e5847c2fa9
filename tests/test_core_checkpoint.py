"""Checkpoints round-trip exactly; every bad file gives a CheckpointError naming it."""

from __future__ import annotations

import json
import re
import shutil
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
from edgeprop.encoders import encoder_widths, make_encoder
from edgeprop.errors import CheckpointError, ConfigError
from edgeprop.frontend import FrontendConfig
from edgeprop.network import ModelConfig, init_params, zero_diagonal
from edgeprop.optim import Adam
from edgeprop.shipped import SHIPPED_MODEL

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
    zero_diagonal(p.w_rec)  # as every learner keeps it (no self-connections)
    # 3 mels, no deltas -> 3 features -> two-sided threshold -> 6 = CFG.n_in inputs
    front = FrontendConfig(n_mels=3, deltas=False).with_normalization(
        [0.5, -1.0, 2.0], [1.0, 2.0, 0.25]).to_dict()
    enc = {"name": "threshold", "n_in": 3, "theta": 0.25, "two_sided": True}
    extra = {"step": 7, "note": "x", "thresholds": np.arange(6, dtype=np.float64),
             "nested": {"a": [1, 2]}}
    path = tmp_path / "m.ckpt"
    save_checkpoint(path, CFG, p, optimizer_state=opt.state_dict(), frontend=front,
                    encoder=enc, labels=["yes", "no", "up", "down"], extra=extra)
    ck = load_checkpoint(path, expect=CFG)
    assert ck.cfg == CFG and ck.format_version == FORMAT_VERSION
    for a, b in zip(p.arrays(), ck.params.arrays(), strict=True):
        assert a.dtype == b.dtype == np.float32
        np.testing.assert_array_equal(a, b)
    assert params_hash(ck.params) == params_hash(p)
    opt2 = Adam(lr=opt.lr)  # the rate is the caller's (test_core_optim), the state is restored
    opt2.load_state_dict(ck.optimizer_state)
    assert opt2.t == opt.t == 3
    for slot in ("m", "v"):
        for a, b in zip(opt.bufs[slot], opt2.bufs[slot], strict=True):
            np.testing.assert_array_equal(a, b)
    assert ck.frontend == front and FrontendConfig.from_dict(ck.frontend).n_features == 3
    assert ck.encoder == enc
    thresholds = ck.extra.pop("thresholds")
    np.testing.assert_array_equal(thresholds, extra["thresholds"])
    assert thresholds.dtype == np.float64
    assert ck.labels == ["yes", "no", "up", "down"] and ck.extra == {"step": 7, "note": "x",
                                                       "nested": {"a": [1, 2]}}
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


def _at(path) -> str:
    """`path` as a literal inside a match pattern."""
    return re.escape(str(path))


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


def test_self_connections_are_refused_at_load(tmp_path):
    """The emulator's PEs drop w_rec's diagonal, the host used it: one checkpoint trained
    two ways on the two backends. The SRNN has none, so such a file is refused."""
    p = init_params(CFG, seed=3)
    p.w_rec[1, 1] = 0.5
    save_checkpoint(tmp_path / "self.ckpt", CFG, p)
    with pytest.raises(CheckpointError, match=r"w_rec has self-connections \(a nonzero "
                                              r"diagonal\)"):
        load_checkpoint(tmp_path / "self.ckpt")


def test_garbage_and_empty_files(tmp_path):
    path = tmp_path / "g.ckpt"
    path.write_bytes(np.random.default_rng(0).bytes(1000))
    _raises(path, "not an edgeprop checkpoint")
    path.write_bytes(b"")
    _raises(path, "not an edgeprop checkpoint")
    # the hint names the verbs that write checkpoints (there is no `edgeprop save`)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "edgeprop save" not in str(err.value)
    for verb in ("edgeprop pretrain", "edgeprop personalize --out",
                 "edgeprop serve --checkpoint-dir"):
        assert verb in str(err.value)


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
    (lambda m: m["model"].update(n_in="abc"), "invalid model config: n_in must be an integer"),
    (lambda m: m.update(labels=5), "labels is a int, not a list"),
    (lambda m: m.update(labels=[1, 2, 3, 4]), "labels must be names"),
    (lambda m: m.update(labels=["a", "b", "a", "c"]), "labels repeat: 'a' \\(2 times\\)"),
    (lambda m: m.update(labels=["a", "b"]), "has 2 labels but 4 outputs"),
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
from edgeprop.encoders import encoder_widths, make_encoder
from edgeprop.errors import CheckpointError, ConfigError
from edgeprop.network import ModelConfig, init_params
from edgeprop.shipped import SHIPPED_MODEL
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


# ---------------------------------------------------------------- model config fields
@pytest.mark.parametrize("field, value, says", [
    ("v_th", "one", "v_th must be a number (not NaN), got 'one'"),
    ("beta", None, "beta must be a number (not NaN), got None"),
    ("tau_a", float("nan"), "tau_a must be a number (not NaN), got nan"),
    ("n_rec", 9.0, "n_rec must be an integer, got 9.0"),
    ("n_out", True, "n_out must be an integer, got True"),
    ("neuron", 1, "neuron must be a string, got 1"),
    ("beta", -0.1, "beta must be >= 0, got -0.1"),
    ("gamma", 0.0, "gamma must be > 0, got 0.0"),
    ("feedback", ["random"], "feedback must be a string, got ['random']"),
])
def test_model_field_of_the_wrong_type_is_named(tmp_path, field, value, says):
    """Hand-edited types name the field and value, not "'>' not supported ..."."""
    path = tmp_path / "m.ckpt"
    _save(path)
    _rewrite(path, edit_meta=lambda m: m["model"].update({field: value}))
    _raises(path, f"{_at(path)} has an invalid model config: {re.escape(says)}$")


def test_model_config_accepts_numpy_and_int_numbers():
    cfg = ModelConfig(n_in=np.int64(6), n_rec=9, n_out=4, tau_m=5, beta=np.float32(0.2))
    assert cfg.n_in == 6 and cfg.alpha == pytest.approx(np.exp(-1 / 5))
    with pytest.raises(ConfigError, match="gamma must be a number"):
        ModelConfig(gamma="0.3")


@pytest.mark.parametrize("field", ["beta", "neuron", "n_in", "feedback"])
def test_model_field_missing_is_an_error_not_a_default(tmp_path, field):
    """Every format-1 checkpoint stores all fields; a default would run another model."""
    path = tmp_path / "m.ckpt"
    _save(path)
    _rewrite(path, edit_meta=lambda m: m["model"].pop(field))
    _raises(path, rf"{_at(path)} has an incomplete model config: model\.{field} missing")


@pytest.mark.parametrize("edit, says", [
    (lambda fe: fe.pop("sample_rate"), r"incomplete frontend config: frontend\.sample_rate "
                                       "missing"),
    (lambda fe: fe.update(n_mels="lots"), "invalid frontend config: frontend setting n_mels "
                                          "must be an integer, got 'lots'"),
    (lambda fe: fe.update(fmax=float("nan")), "fmax must be a finite number, got nan"),
    (lambda fe: fe.update(hop_ms=float("inf")), "hop_ms must be a finite number, got inf"),
    (lambda fe: fe.update(deltas=1), "deltas must be true or false, got 1"),
    (lambda fe: fe.update(hop_ms=-10.0), "need 0 < hop <= win samples"),
    (lambda fe: fe.update(window=[1, 2]), r"unknown frontend settings: \['window'\]"),
])
def test_a_stored_frontend_is_checked_in_full_at_load(tmp_path, edit, says):
    """A frontend that would silently take a default (the sample rate above all) or fail
    deep in the feature maths is refused with the file named."""
    path = tmp_path / "m.ckpt"
    _save(path, frontend=FrontendConfig(n_mels=3, deltas=False).to_dict(),
          encoder={"name": "threshold", "n_in": 3, "theta": 0.25, "two_sided": True})
    load_checkpoint(path)  # as saved: fine
    _rewrite(path, edit_meta=lambda m: edit(m["frontend"]))
    _raises(path, f"checkpoint {_at(path)} has an .*{says}")


def test_model_config_missing_altogether(tmp_path):
    path = tmp_path / "m.ckpt"
    _save(path)
    _rewrite(path, edit_meta=lambda m: m.pop("model"))
    _raises(path, rf"corrupt checkpoint {_at(path)}: meta.json has no model config")
    _rewrite(path, edit_meta=lambda m: m.update(model=[1]))
    _raises(path, "no model config .model is list")


def test_every_checkpoint_in_the_repo_still_loads():
    """The checkpoints in the repo (today the shipped model alone; the other .npz files
    are recordings) pass the stricter checks: all are format 1 with full configs."""
    repo = Path(__file__).resolve().parents[1]
    found = [p for p in repo.rglob("*.npz") if ".git" not in p.parts and _is_checkpoint(p)]
    assert Path(SHIPPED_MODEL).resolve() in [p.resolve() for p in found]
    for p in found:
        ck = load_checkpoint(p)
        assert encoder_widths(ck.encoder)[1] == ck.cfg.n_in


def _is_checkpoint(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            if "meta.json" not in zf.namelist():
                return False
            return json.loads(zf.read("meta.json")).get("magic") == "edgeprop-checkpoint"
    except (zipfile.BadZipFile, ValueError, AttributeError):
        return False


# ---------------------------------------------------------------- encoder / frontend widths
def _shipped_copy(tmp_path, edit) -> Path:
    """The shipped checkpoint with `edit` applied to its meta.json (the audit's case)."""
    path = tmp_path / "kws.npz"
    shutil.copyfile(SHIPPED_MODEL, path)
    _rewrite(path, edit_meta=edit)
    return path


def test_encoder_width_that_does_not_fit_the_model_fails_at_load(tmp_path):
    path = _shipped_copy(tmp_path, lambda m: m["encoder"].update(n_in=40))
    _raises(path, rf"{_at(path)}: its current encoder gives 40 inputs \(encoder.n_in = 40\) "
                  r"but the model takes model.n_in = 80")


def test_encoder_width_counts_delta_and_two_sided_channels(tmp_path):
    path = tmp_path / "m.ckpt"
    _save(path, encoder={"name": "delta", "n_in": 3, "theta": 0.5, "substeps": 2})
    assert load_checkpoint(path).encoder["name"] == "delta"  # 2 x 3 = 6 = n_in
    _rewrite(path, edit_meta=lambda m: m["encoder"].update(name="threshold"))
    _raises(path, r"threshold encoder: unknown options \['substeps'\]")
    _rewrite(path, edit_meta=lambda m: m.update(encoder={"name": "threshold", "n_in": 3}))
    _raises(path, r"threshold encoder gives 3 inputs \(encoder.n_in = 3\).*model.n_in = 6")
    _rewrite(path, edit_meta=lambda m: m["encoder"].update(two_sided=True))
    assert load_checkpoint(path).encoder["two_sided"] is True


@pytest.mark.parametrize("encoder, says", [
    ({"name": "bogus", "n_in": 6}, "unknown encoder 'bogus'"),
    ({"n_in": 6}, "unknown encoder None"),
    ({"name": "current", "n_in": "6"}, "current encoder: n_in must be an integer >= 1, got '6'"),
    ({"name": "delta", "n_in": 3, "theta": 0}, "delta encoder: theta must be a number > 0"),
    ({"name": "threshold", "n_in": 6, "two_sided": "no"},
     "threshold encoder: two_sided must be true or false, got 'no'"),
])
def test_bad_encoder_config_is_named_at_load(tmp_path, encoder, says):
    path = tmp_path / "m.ckpt"
    _save(path)
    _rewrite(path, edit_meta=lambda m: m.update(encoder=encoder))
    _raises(path, rf"{_at(path)} has an invalid encoder config: {re.escape(says)}")


@pytest.mark.parametrize("name, opts", [
    ("current", {}), ("delta", {}), ("delta", {"substeps": 3}), ("threshold", {}),
    ("threshold", {"two_sided": True}),
])
def test_encoder_widths_agrees_with_the_built_encoder(name, opts):
    enc = make_encoder(name, 7, **opts)
    assert encoder_widths(enc.to_dict()) == (enc.n_in, enc.n_out)


def test_frontend_features_that_do_not_feed_the_encoder_fail_at_load(tmp_path):
    path = _shipped_copy(tmp_path, lambda m: m["frontend"].update(deltas=False))
    _raises(path, rf"{_at(path)}: its frontend gives 40 features \(frontend.n_mels = 40, "
                  r"deltas off\) but encoder.n_in = 80")
    path = _shipped_copy(tmp_path, lambda m: m.update(encoder=None)
                         or m["frontend"].update(n_mels=20))
    _raises(path, r"frontend gives 40 features .* but model.n_in \(no encoder\) = 80")


def test_width_mismatch_is_one_cli_line_naming_the_file(tmp_path):
    """The audit's case end to end: evaluate stops at load, exit 2, no traceback."""
    path = _shipped_copy(tmp_path, lambda m: m["encoder"].update(n_in=40))
    out = subprocess.run([sys.executable, "-m", "runtime.cli", "evaluate", "--model",
                          str(path), "--data", str(tmp_path), "--quiet"],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr
    assert lines[0].startswith("edgeprop evaluate: error: checkpoint ")
    assert str(path) in lines[0] and "40 inputs" in lines[0] and "n_in = 80" in lines[0]


def test_missing_array_member_names_the_file(tmp_path):
    path = tmp_path / "m.ckpt"
    _save(path, extra={"a": np.zeros(2)})
    _rewrite(path, edit_meta=lambda m: m["extra"].update(a={"__ndarray__": "arrays/99"}))
    _raises(path, rf"corrupt checkpoint {_at(path)}: missing array member 'arrays/99'")
    _rewrite(path, edit_meta=lambda m: m["extra"].update(a={"__ndarray__": [1]}))
    _raises(path, r"missing array member \[1\]")


def test_sample_rate_the_frontend_supports_is_not_rejected(tmp_path):
    """8 kHz with fmax 4 kHz is a valid frontend (audio is resampled to it); the
    checkpoint records no training rate apart from a hash that personalisation
    legitimately moves, so load accepts it (see the frontend's own range checks)."""
    path = _shipped_copy(tmp_path, lambda m: m["frontend"].update(sample_rate=8000))
    assert load_checkpoint(path).frontend["sample_rate"] == 8000
