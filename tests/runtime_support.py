"""Helpers for the runtime tests: a small real checkpoint, real clips, a learner in a thread."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeprop.checkpoint import save_checkpoint
from edgeprop.encoders import make_encoder
from edgeprop.frontend import FrontendConfig, features
from edgeprop.network import KWS_LABELS, ModelConfig, init_params
from runtime.stream import build_stream, embedded_clips


def make_checkpoint(path: Path, seed: int = 0, encoder: str = "current") -> Path:
    """init_params + a frontend normalised on the embedded clips: a real, valid model."""
    fe = FrontendConfig()
    stream = build_stream(embedded_clips()[:8], seed=seed)
    fe = fe.with_normalization(*_norm(features(stream.audio, fe)))
    cfg = ModelConfig()
    enc = make_encoder(encoder, fe.n_features)
    if enc.n_out != cfg.n_in:
        cfg = ModelConfig(n_in=enc.n_out)
    save_checkpoint(path, cfg, init_params(cfg, seed), frontend=fe.to_dict(),
                    encoder=enc.to_dict(), labels=list(KWS_LABELS), extra={"note": "test"})
    return path


def _norm(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return f.mean(axis=0), np.maximum(f.std(axis=0), 1e-3)
