"""Checkpoints: weights, optimizer state and the full config in one versioned file.

Format (FORMAT_VERSION 1): a zip archive readable by ``np.load`` (an .npz), members

- ``meta.json``: {"magic": "edgeprop-checkpoint", "format_version": 1, "model": ModelConfig
  dict, "params_sha256": params_hash, "optimizer_state", "frontend", "encoder", "labels",
  "extra"}. Nested dicts/lists are JSON; every NumPy array inside them is stored as its
  own member and referenced as {"__ndarray__": "<member>"}.
- ``params/w_in.npy``, ``params/w_rec.npy``, ``params/w_out.npy``, ``params/b_fb.npy``
  (float32) and ``arrays/<n>.npy`` for the arrays referenced from meta.json.

Arrays are written with allow_pickle=False, so loading never runs code. Writes are
atomic: a temp file in the same folder, fsync, then os.replace, so a crash or full disk
leaves the previous checkpoint intact. Every problem a user can hit on load is a
CheckpointError that names the file and the field: the model config must be complete
and typed, and frontend features -> encoder -> model inputs must chain.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from edgeprop.atomic_file import atomic_open
from edgeprop.errors import CheckpointError, EdgepropError
from edgeprop.network import DTYPE, ModelConfig, Params

FORMAT_VERSION = 1
MAGIC = "edgeprop-checkpoint"
_PARAM_NAMES = ("w_in", "w_rec", "w_out", "b_fb")


@dataclass
class Checkpoint:
    cfg: ModelConfig
    params: Params
    optimizer_state: dict | None = None
    frontend: dict | None = None
    encoder: dict | None = None
    labels: list[str] | None = None
    extra: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    #: the file it was loaded from (None when built in memory): for messages that must
    #: name it, such as a resumed learner.ckpt whose optimizer state does not fit
    path: str | None = field(default=None, compare=False)


def params_hash(params: Params) -> str:
    """sha256 over names, shapes and little-endian float32 bytes of all weight arrays."""
    h = hashlib.sha256()
    for name, a in zip(_PARAM_NAMES, params.arrays(), strict=True):
        a = np.ascontiguousarray(a, dtype="<f4")
        h.update(f"{name}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    return {
        "w_in": (cfg.n_rec, cfg.n_in),
        "w_rec": (cfg.n_rec, cfg.n_rec),
        "w_out": (cfg.n_out, cfg.n_rec),
        "b_fb": (cfg.n_rec, cfg.n_out),
    }


# ---------------------------------------------------------------- tree <-> json + arrays
def _encode(obj: Any, arrays: dict[str, np.ndarray], where: str) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise CheckpointError(f"{where}: object arrays cannot be stored (no pickling)")
        name = f"arrays/{len(arrays)}"
        arrays[name] = obj
        return {"__ndarray__": name}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise CheckpointError(f"{where}: dict keys must be strings, got {k!r}")
            out[k] = _encode(v, arrays, f"{where}.{k}")
        return out
    if isinstance(obj, (list, tuple)):
        return [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise CheckpointError(f"{where}: cannot store a {type(obj).__name__} in a checkpoint")


def _decode(obj: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__ndarray__"}:
            name = obj["__ndarray__"]
            if not isinstance(name, str) or name not in arrays:
                raise CheckpointError(f"missing array member {name!r}")
            return arrays[name]
        return {k: _decode(v, arrays) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, arrays) for v in obj]
    return obj


# ---------------------------------------------------------------- save
def _write_zip(f, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.writestr("meta.json", json.dumps(meta, indent=1, sort_keys=True))
        for name, a in arrays.items():
            with zf.open(name + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(a), allow_pickle=False)


def save_checkpoint(
    path: str | os.PathLike,
    cfg: ModelConfig,
    params: Params,
    *,
    optimizer_state: dict | None = None,
    frontend: dict | None = None,
    encoder: dict | None = None,
    labels: list[str] | None = None,
    extra: dict | None = None,
) -> None:
    """Write a checkpoint atomically (temp file in the same folder, fsync, os.replace)."""
    path = Path(path)
    shapes = _expected_shapes(cfg)
    arrays: dict[str, np.ndarray] = {}
    for name, a in zip(_PARAM_NAMES, params.arrays(), strict=True):
        a = np.asarray(a)
        if a.shape != shapes[name]:
            raise CheckpointError(f"params.{name} has shape {a.shape}, config says {shapes[name]}")
        arrays[f"params/{name}"] = a.astype(DTYPE, copy=False)
    meta = {
        "magic": MAGIC,
        "format_version": FORMAT_VERSION,
        "model": cfg.to_dict(),
        "params_sha256": params_hash(params),
        "optimizer_state": _encode(optimizer_state, arrays, "optimizer_state"),
        "frontend": _encode(frontend, arrays, "frontend"),
        "encoder": _encode(encoder, arrays, "encoder"),
        "labels": _encode(None if labels is None else list(labels), arrays, "labels"),
        "extra": _encode(dict(extra or {}), arrays, "extra"),
    }
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise CheckpointError(f"cannot write checkpoint {path}: folder {folder} does not exist")
    try:
        with atomic_open(path, "wb", make_dirs=False) as f:
            _write_zip(f, meta, arrays)
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint {path}: {exc}") from exc


# ---------------------------------------------------------------- load
def _read_members(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint path is a folder, not a file: {path}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
    if head[:2] != b"PK":
        raise CheckpointError(
            f"{path} is not an edgeprop checkpoint (not a zip/.npz file; checkpoints are "
            "written by edgeprop pretrain, edgeprop personalize --out and edgeprop serve "
            "--checkpoint-dir)"
        )
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if "meta.json" not in names:
                raise CheckpointError(
                    f"{path} is not an edgeprop checkpoint (no meta.json member)"
                )
            try:
                meta = json.loads(zf.read("meta.json").decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CheckpointError(f"corrupt checkpoint {path}: bad meta.json ({exc})") from None
            arrays = {}
            for n in sorted(names):
                if n.endswith(".npy"):
                    with zf.open(n) as member:
                        arrays[n[:-4]] = np.lib.format.read_array(member, allow_pickle=False)
    except EdgepropError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError) as exc:
        raise CheckpointError(
            f"corrupt or truncated checkpoint {path}: {exc}. Re-save or restore a backup."
        ) from None
    return meta, arrays


def _model_config(path: Path, d: Any) -> ModelConfig:
    """The stored ModelConfig, complete and typed.

    save_checkpoint writes every field (the field set is unchanged since format 1
    began), so a missing one means a hand-edited meta.json; filling in the default
    would silently run another model than the one the weights were trained as."""
    if not isinstance(d, dict):
        raise CheckpointError(f"corrupt checkpoint {path}: meta.json has no model config "
                              f"(model is {type(d).__name__ if d is not None else 'missing'})")
    missing = [f.name for f in fields(ModelConfig) if f.name not in d]
    if missing:
        raise CheckpointError(f"checkpoint {path} has an incomplete model config: "
                              f"model.{', model.'.join(missing)} missing")
    try:
        return ModelConfig.from_dict(d)
    except (EdgepropError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} has an invalid model config: {exc}") from None


def _check_frontend(path: Path, frontend: dict | None) -> None:
    """The stored feature chain parses in full with every setting present. A missing one
    (the sample rate above all) would silently take its default and feed the weights
    features they were never trained on; save_checkpoint callers store to_dict()."""
    from edgeprop.frontend import FrontendConfig

    if frontend is None:
        return
    missing = [f.name for f in fields(FrontendConfig)
               if f.name not in frontend and f.name not in ("norm_mean", "norm_std")]
    if missing:
        raise CheckpointError(f"checkpoint {path} has an incomplete frontend config: "
                              f"frontend.{', frontend.'.join(missing)} missing")
    try:
        FrontendConfig.from_dict(frontend)
    except (EdgepropError, TypeError, ValueError, ArithmeticError) as exc:
        raise CheckpointError(f"checkpoint {path} has an invalid frontend config: "
                              f"{exc}") from None


def _check_widths(path: Path, cfg: ModelConfig, encoder: dict | None,
                  frontend: dict | None) -> None:
    """Frontend features -> encoder -> model inputs must chain at every link.

    Otherwise evaluate/profile feed the wrong width and the runtime starts, then
    rejects every stream ("frames of 1x40 != model's 1x80") without naming the file.
    No encoder means the current encoder at the model's width (what every consumer
    falls back to). Sizes of the wrong type are skipped here: _check_frontend, run next,
    parses the frontend in full."""
    from edgeprop.encoders import encoder_widths
    from edgeprop.frontend import FrontendConfig

    if encoder is None:
        n_feat = cfg.n_in
    else:
        try:
            n_feat, width = encoder_widths(encoder)
        except EdgepropError as exc:
            raise CheckpointError(f"checkpoint {path} has an invalid encoder config: "
                                  f"{exc}") from None
        if width != cfg.n_in:
            raise CheckpointError(
                f"checkpoint {path}: its {encoder['name']} encoder gives {width} inputs "
                f"(encoder.n_in = {n_feat}) but the model takes model.n_in = {cfg.n_in}")
    if frontend is None:
        return
    n_mels = frontend.get("n_mels", FrontendConfig.n_mels)
    deltas = frontend.get("deltas", FrontendConfig.deltas)
    if isinstance(n_mels, int) and not isinstance(n_mels, bool) and isinstance(deltas, bool):
        feats = n_mels * (2 if deltas else 1)
        if feats != n_feat:
            into = "encoder.n_in" if encoder is not None else "model.n_in (no encoder)"
            raise CheckpointError(
                f"checkpoint {path}: its frontend gives {feats} features (frontend.n_mels = "
                f"{n_mels}, deltas {'on' if deltas else 'off'}) but {into} = {n_feat}")


def model_differences(got: dict, want: dict) -> list[tuple[str, Any, Any]]:
    """(field, got, want) for each model-config field whose values differ."""
    return [(k, v, want.get(k)) for k, v in got.items() if want.get(k) != v]


def check_model(path: str | os.PathLike, cfg: ModelConfig, expect: ModelConfig) -> None:
    """CheckpointError naming every field of `cfg` that differs from `expect`."""
    if cfg != expect:
        diffs = [f"{k}={v!r} (expected {w!r})"
                 for k, v, w in model_differences(cfg.to_dict(), expect.to_dict())]
        raise CheckpointError(
            f"checkpoint {path} is for another model: " + ", ".join(diffs)
        )


def load_checkpoint(path: str | os.PathLike, *, expect: ModelConfig | None = None) -> Checkpoint:
    """Read and validate a checkpoint; `expect` demands the same model config."""
    path = Path(path)
    meta, arrays = _read_members(path)
    if not isinstance(meta, dict) or meta.get("magic") != MAGIC:
        raise CheckpointError(f"{path} is not an edgeprop checkpoint (wrong magic in meta.json)")
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"corrupt checkpoint {path}: bad format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version}, newer than this edgeprop reads "
            f"({FORMAT_VERSION}); upgrade edgeprop"
        )
    cfg = _model_config(path, meta.get("model"))
    if expect is not None:
        check_model(path, cfg, expect)
    shapes = _expected_shapes(cfg)
    ps = []
    for name in _PARAM_NAMES:
        a = arrays.get(f"params/{name}")
        if a is None:
            raise CheckpointError(f"corrupt checkpoint {path}: weight array {name} missing")
        if a.dtype != DTYPE:
            raise CheckpointError(f"checkpoint {path}: {name} has dtype {a.dtype}, not float32")
        if a.shape != shapes[name]:
            raise CheckpointError(
                f"checkpoint {path}: {name} has shape {a.shape} but its config implies "
                f"{shapes[name]}"
            )
        if not np.isfinite(a).all():
            raise CheckpointError(f"checkpoint {path}: {name} contains NaN or inf weights")
        ps.append(np.ascontiguousarray(a))
    params = Params(*ps)
    if meta.get("params_sha256") != params_hash(params):
        raise CheckpointError(f"corrupt checkpoint {path}: weights do not match their hash")
    if np.diagonal(params.w_rec).any():  # the model has no self-connections: the
        # emulator's PEs drop them, the host would use them, and the two would differ
        raise CheckpointError(f"checkpoint {path}: w_rec has self-connections (a nonzero "
                              "diagonal); the SRNN has none: zero them "
                              "(edgeprop.network.zero_diagonal) and save it again")
    try:
        parts = {name: _decode(meta.get(name), arrays)
                 for name in ("labels", "optimizer_state", "frontend", "encoder", "extra")}
    except CheckpointError as exc:
        raise CheckpointError(f"corrupt checkpoint {path}: {exc}") from None
    for name, value in parts.items():  # a hand-edited meta.json must not fail later
        want = (list, np.ndarray) if name == "labels" else (dict,)
        if value is not None and not isinstance(value, want):
            raise CheckpointError(f"corrupt checkpoint {path}: {name} is a "
                                  f"{type(value).__name__}, not a {want[0].__name__}")
    _check_widths(path, cfg, parts["encoder"], parts["frontend"])  # the plainest message
    _check_frontend(path, parts["frontend"])
    labels = parts["labels"]
    if labels is not None and not all(isinstance(s, str) for s in labels):
        raise CheckpointError(f"corrupt checkpoint {path}: labels must be names (strings), "
                              f"got {list(labels)!r}")
    ckpt = Checkpoint(
        cfg=cfg,
        params=params,
        optimizer_state=parts["optimizer_state"],
        frontend=parts["frontend"],
        encoder=parts["encoder"],
        labels=None if labels is None else list(labels),
        extra=parts["extra"] or {},
        format_version=version,
        path=str(path),
    )
    if labels is not None:  # named labels must fit the outputs (unnamed: at use)
        from edgeprop.evaluation import model_labels

        try:
            model_labels(ckpt)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
    return ckpt
