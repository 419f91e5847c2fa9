"""Judging a checkpoint on a Speech Commands folder: accuracy, per class, confusion.

The features are computed with the checkpoint's own frontend config (normalisation
included) and passed through its encoder, so the network sees exactly what it saw in
training. Words outside the checkpoint's labels become `_unknown_` (the dataset
scanner does that); a class with no clips in the folder gets accuracy None.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeprop.checkpoint import Checkpoint
from edgeprop.datasets import Clip, ScanResult, scan_speech_commands
from edgeprop.errors import CheckpointError
from edgeprop.frontend import FrontendConfig
from edgeprop.network import KWS_LABELS


@dataclass
class EvalResult:
    accuracy: float
    n: int
    labels: list[str]
    per_class: dict[str, float | None]
    per_class_n: dict[str, int]
    confusion: np.ndarray  # (K, K) rows = true label, columns = predicted

    def to_dict(self) -> dict:
        return {
            "accuracy": self.accuracy, "n": self.n, "labels": self.labels,
            "per_class": self.per_class, "per_class_n": self.per_class_n,
            "confusion": self.confusion.tolist(),
        }


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    m = np.zeros((k, k), np.int64)
    np.add.at(m, (np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)), 1)
    return m


def summarize(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> EvalResult:
    """Accuracy, per-class accuracy (None for absent classes) and the confusion matrix."""
    k = len(labels)
    cm = confusion_matrix(y_true, y_pred, k)
    n = int(cm.sum())
    per_n = cm.sum(axis=1)
    per = {lab: (float(cm[i, i] / per_n[i]) if per_n[i] else None)
           for i, lab in enumerate(labels)}
    acc = float(np.trace(cm) / n) if n else float("nan")
    return EvalResult(acc, n, list(labels), per, {lab: int(per_n[i]) for i, lab in
                                                   enumerate(labels)}, cm)


def checkpoint_frontend(ckpt: Checkpoint) -> FrontendConfig:
    if not ckpt.frontend:
        raise CheckpointError("checkpoint has no frontend config; it cannot be evaluated on "
                              "audio (was it written by edgeprop pretrain?)")
    try:
        fcfg = FrontendConfig.from_dict(ckpt.frontend)
    except Exception as exc:  # noqa: BLE001 - any malformed dict is the checkpoint's fault
        raise CheckpointError(f"checkpoint frontend config is invalid: {exc}") from None
    if fcfg.n_features != ckpt.cfg.n_in and not ckpt.encoder:
        raise CheckpointError(f"checkpoint frontend gives {fcfg.n_features} features but the "
                              f"model takes {ckpt.cfg.n_in} inputs")
    return fcfg


def encode_batch(ckpt: Checkpoint, feats: np.ndarray) -> np.ndarray:
    """Features (N, T, F) -> network input (N, T', n_in) through the checkpoint's encoder."""
    from edgeprop.encoders import encoder_from_dict

    enc = encoder_from_dict(ckpt.encoder or {"name": "current", "n_in": feats.shape[-1]})
    if enc.name == "current":
        out = feats
    else:
        out = np.stack([enc.encode(f) for f in feats])
    if out.shape[-1] != ckpt.cfg.n_in:
        raise CheckpointError(f"encoder gives {out.shape[-1]} inputs, model takes "
                              f"{ckpt.cfg.n_in}")
    return out


def model_labels(ckpt: Checkpoint) -> list[str]:
    """The checkpoint's readout labels (KWS_LABELS when it names none), checked.

    Clips are scanned with these labels and each clip's label index picks the output
    it is scored or trained against, so the labels must be one per output and each
    once: a repeated name leaves all but one of its outputs without clips, and labels
    past the last output give clips an index no output answers to.
    """
    labels, n_out = list(ckpt.labels or KWS_LABELS), ckpt.cfg.n_out
    repeated = {lab: n for lab, n in Counter(labels).items() if n > 1}
    if repeated:
        names = ", ".join(f"{lab!r} ({n} times)" for lab, n in repeated.items())
        raise CheckpointError(f"checkpoint labels repeat: {names}; each of its "
                              f"{n_out} outputs needs a label of its own")
    if len(labels) != n_out:
        what = (f"has {len(labels)} labels but {n_out} outputs" if ckpt.labels else
                f"names no labels, so clips get the {len(labels)} default ones, but it has "
                f"{n_out} outputs")
        lost = (f": clips of {', '.join(labels[n_out:])} would have no output"
                if len(labels) > n_out else "")
        raise CheckpointError(f"checkpoint {what}{lost}; it needs one label per output")
    return labels


def evaluate_clips(ckpt: Checkpoint, clips: list[Clip], *, cache=None,
                   progress: Callable[[int], None] | None = None,
                   batch: int = 128) -> EvalResult:
    """Classify `clips` with the checkpoint (labels of the scan = labels of the model)."""
    from edgeprop.feature_cache import FeatureCache
    from edgeprop.training import predict_logits

    labels = model_labels(ckpt)
    fcfg = checkpoint_frontend(ckpt)
    cache = cache or FeatureCache()
    y_true = np.array([c.label_index for c in clips], np.int64)
    y_pred = np.empty(len(clips), np.int64)
    for s in range(0, len(clips), batch):
        chunk = clips[s:s + batch]
        feats = encode_batch(ckpt, cache.features(chunk, fcfg))
        y_pred[s:s + len(chunk)] = predict_logits(ckpt.cfg, ckpt.params, feats).argmax(1)
        if progress:
            progress(len(chunk))
    return summarize(y_true, y_pred, labels)


def scan_for_model(root: str | Path, ckpt: Checkpoint) -> list[Clip]:
    """Clips of a Speech Commands folder, labelled with the checkpoint's label set."""
    return scan_folder_for_model(root, ckpt).clips


def scan_folder_for_model(root: str | Path, ckpt: Checkpoint) -> ScanResult:
    """The whole scan (clips and what was skipped, for a note) with the model's labels;
    a missing folder or a file is the scan's error."""
    return scan_speech_commands(root, tuple(model_labels(ckpt)))
