"""Memory and accuracy of each storage variant: the table the default precision is chosen by.

Protocol (same for every variant, so only the storage format differs):
1. start from one checkpoint (the shipped pretrained keyword spotter);
2. map it on `n_pes` PEs in the variant's formats (weights are quantised on load);
3. fine-tune online with e-prop on `train_x` (one sample at a time, apply after each,
   mean loss, Adam), as the chip would adapt in the field;
4. read the weights back from the PEs' SRAM and classify `val_x` (speaker-disjoint
   from the training clips) with the float32 forward pass: what the chip's M4F
   computes with those stored weights.
Accuracy is compared with the fp32 variant run the same way.
"""

from __future__ import annotations

import time

import numpy as np

from edgeprop.network import ModelConfig, Params
from firmware_model.learner import EmulatedLearner
from firmware_model.precision import VARIANTS


def accuracy(cfg: ModelConfig, params: Params, x: np.ndarray, y: np.ndarray) -> float:
    from edgeprop.training import predict_logits

    return float((predict_logits(cfg, params, x).argmax(1) == y).mean())


def measure_variant(name: str, cfg: ModelConfig, params: Params, train_x: np.ndarray,
                    train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *,
                    n_pes: int = 12, lr: float = 1e-4, seed: int = 0,
                    progress=None) -> dict:
    """One row of the table: memory on the chip and validation accuracy after adaptation."""
    emu = EmulatedLearner(cfg, params.copy(), n_pes=n_pes, precision=name, lr=lr, seed=seed)
    try:
        mem = emu.memory()
        acc0 = accuracy(cfg, emu.params, val_x, val_y)  # quantised, before adaptation
        order = np.random.default_rng(seed).permutation(len(train_x))
        t0 = time.perf_counter()
        losses = []
        for i in order:
            loss, _ = emu.train_sample(train_x[i], int(train_y[i]))
            emu.apply()
            losses.append(loss)
            if progress:
                progress(1)
        wall = time.perf_counter() - t0
        acc1 = accuracy(cfg, emu.params, val_x, val_y)
        prof = emu.profile()
    finally:
        emu.close()
    return {
        "precision": name,
        "description": VARIANTS[name].description,
        "memory_total_bytes": mem["total"],
        "memory_max_pe_bytes": mem["max_pe"],
        "memory_by_region": mem["by_region"],
        "fits_340KiB": mem["total"] <= 348_160,
        "fits_256KiB": mem["total"] <= 262_144,
        "val_accuracy_before": acc0,
        "val_accuracy": acc1,
        "train_clips": int(len(train_x)),
        "train_loss_mean": float(np.mean(losses)) if losses else None,
        "step_time_us": prof["step_time_us"],
        "energy_per_sample_uj": prof["energy_per_sample_uj"],
        "emulator_realtime_factor": len(train_x) / wall if wall > 0 else None,
    }


def choose_default(rows: list[dict], tolerance_points: float = 1.0) -> str | None:
    """Smallest-memory variant whose accuracy is within `tolerance_points` of fp32's."""
    base = next((r for r in rows if r["precision"] == "fp32"), None)
    if base is None:
        return None
    ok = [r for r in rows
          if 100 * (base["val_accuracy"] - r["val_accuracy"]) <= tolerance_points
          and not VARIANTS[r["precision"]].fused]
    return min(ok, key=lambda r: r["memory_total_bytes"])["precision"] if ok else None
