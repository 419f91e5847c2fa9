"""`edgeprop bench frontend`: feature frontend + encoder speed and exactness.

Measures, on real speech_commands_dev clips:
- stream_us_per_frame: median time of one `StreamingFrontend.push` of a 10 ms block
  (160 samples) plus one encoder `step`, per encoder (the encoders and the frontend
  alone take turns clip by clip); the headline number uses the `--encoder` (default
  delta). Target <= 50 us (goal 20 us); 10 ms / it = x real time.
- batch_ms_per_clip: `features` on a (B, 16000) batch, per clip, median of repeats;
  beside it librosa's melspectrogram (+ log, no deltas) on the same clips as baseline.
- max_abs_err_stream_vs_batch: streaming with random block sizes (1 .. 10,000) against
  batch, normalised features.
- max_abs_err_vs_librosa: our un-normalised log-mel against
  log(librosa.feature.melspectrogram + floor) with aligned framing.
- sparsity per encoder (fraction of zeros) with the frontend normalised on the clips.
- mic_resampling, for a microphone without 16 kHz (runtime.sources): the clips taken up
  to 44.1 / 48 kHz, then brought back in 10 ms blocks by StreamResampler: median us per
  block, how long a sample waits in soxr (ms after its block was captured, median and
  max) and the largest difference from librosa.resample of the whole (load_wav's path).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from edgeprop.datasets import load_clips, require_data_dir, scan_speech_commands
from edgeprop.encoders import ENCODERS, make_encoder, sparsity
from edgeprop.frontend import (
    FrontendConfig,
    StreamingFrontend,
    features,
    fit_normalization,
    librosa_log_mel,
    raw_log_mel,
)
from runtime.arg_types import folder, nonneg_int, pos_int
from runtime.console import add_output_flags, print_json, say


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=folder, default=None,
                        help="Speech Commands folder (default ../shared/data/speech_commands_dev)")
    parser.add_argument("--clips", type=pos_int, default=200,
                        help="clips for sparsity and exactness (default 200, every k-th)")
    parser.add_argument("--timed-clips", type=pos_int, default=20,
                        help="clips streamed frame by frame for timing (default 20)")
    parser.add_argument("--repeats", type=pos_int, default=5, help="timing repeats (default 5)")
    parser.add_argument("--encoder", default="delta", choices=sorted(ENCODERS),
                        help="encoder of the headline stream_us_per_frame (default delta)")
    parser.add_argument("--seed", type=nonneg_int, default=0)
    add_output_flags(parser)


def _stream_times(audio: np.ndarray, cfg: FrontendConfig, enc_names: list[str | None],
                  repeats: int) -> dict[str | None, np.ndarray]:
    """Per-frame (us) push(160 samples) [+ encoder.step], every frame of every clip, for
    each encoder (None: the frontend alone). The variants take turns clip by clip, so
    load that comes and goes on a shared machine hits them alike."""
    variants = [(name, StreamingFrontend(cfg), make_encoder(name, cfg.n_features)
                 if name else None) for name in enc_names]
    hop = cfg.hop
    times: dict[str | None, list[int]] = {name: [] for name in enc_names}
    clock = time.perf_counter_ns
    for _ in range(repeats):
        for clip in audio:
            for name, fe, enc in variants:
                fe.reset()
                if enc:
                    enc.reset()
                out = times[name]
                for i in range(0, clip.shape[0], hop):
                    block = clip[i:i + hop]
                    t0 = clock()
                    frames = fe.push(block)
                    if enc is not None:
                        for f in frames:
                            enc.step(f)
                    out.append(clock() - t0)
    return {name: np.asarray(t, dtype=np.float64) / 1000.0 for name, t in times.items()}


def _mic_resampling(audio: np.ndarray, rates: tuple[int, ...]) -> dict[str, dict]:
    import librosa

    from edgeprop.audio import StreamResampler

    out = {}
    clock = time.perf_counter_ns
    for rate in rates:
        block = rate // 100
        us, hold, err = [], [], 0.0
        for clip in audio:
            # the clip as a microphone at `rate` delivers it: resampling a clip at full
            # scale overshoots 1, which an ADC clips (and the stream would clip too)
            x = np.clip(librosa.resample(clip, orig_sr=16000, target_sr=rate), -1.0, 1.0)
            x = x.astype(np.float32)
            r, got, n_out = StreamResampler(rate, 16000), [], 0
            for i in range(0, x.size, block):
                t0 = clock()
                y = r(x[i:i + block])
                us.append((clock() - t0) / 1000.0)
                got.append(y)
                # output sample k is input time k / 16000 s; it left soxr with this block
                k = n_out + np.arange(y.size)
                hold.extend(((i + x[i:i + block].size) / rate - k / 16000) * 1000.0)
                n_out += y.size
            got.append(r(np.zeros(0, np.float32), last=True))
            whole = librosa.resample(x, orig_sr=rate, target_sr=16000)
            err = max(err, float(np.abs(np.concatenate(got) - whole).max()))
        out[str(rate)] = {"us_per_10ms_block": float(np.median(us)),
                          "hold_ms_median": float(np.median(hold)),
                          "hold_ms_max": float(np.max(hold)),
                          "max_abs_err_vs_whole_file": err}
    return out


def run(args: argparse.Namespace) -> int:
    root = require_data_dir(args.data)
    rng = np.random.default_rng(args.seed)
    clips = scan_speech_commands(root).clips
    step = max(1, len(clips) // max(1, args.clips))
    chosen = clips[::step][: args.clips]
    audio = load_clips(chosen)
    say(f"bench frontend: {len(chosen)} clips from {root}"
        + (f" (all it has; {args.clips} asked for)" if len(chosen) < args.clips else ""))

    base = FrontendConfig()
    raw = features(audio, base)
    cfg = fit_normalization(raw, base)
    feats = features(audio, cfg)

    # exactness ------------------------------------------------------------
    err_stream = 0.0
    for k in range(min(len(audio), 40)):
        fe = StreamingFrontend(cfg)
        out, i = [], 0
        while i < audio.shape[1]:
            n = int(rng.choice([1, 10000, int(rng.integers(1, 4000))], p=[0.05, 0.05, 0.9]))
            if n == 1:  # a run of single samples, not the whole clip (time)
                for j in range(i, min(i + 400, audio.shape[1])):
                    out.append(fe.push(audio[k, j:j + 1]))
                i = min(i + 400, audio.shape[1])
                continue
            out.append(fe.push(audio[k, i:i + n]))
            i += n
        err_stream = max(err_stream, float(np.abs(np.concatenate(out) - feats[k]).max()))
    err_librosa = max(float(np.abs(raw_log_mel(a, base) - librosa_log_mel(a, base)).max())
                      for a in audio[:50])

    # speed ----------------------------------------------------------------
    timed = audio[: args.timed_clips]
    if len(timed) < args.timed_clips:  # the timed clips are taken from the --clips ones
        say(f"bench frontend: timing {len(timed)} clips, not the {args.timed_clips} asked "
            f"for (--timed-clips): only {len(chosen)} clips were loaded (--clips)")
    per_variant = _stream_times(timed, cfg, [None, *sorted(ENCODERS)], args.repeats)
    frontend_only = float(np.median(per_variant.pop(None)))
    stream_by_enc = {name: float(np.median(t)) for name, t in per_variant.items()}
    batch = audio[:32]
    bt, lt = [], []
    import librosa

    def librosa_clip(a: np.ndarray) -> np.ndarray:
        return np.log(librosa.feature.melspectrogram(
            y=a, sr=16000, n_fft=512, hop_length=160, win_length=480, n_mels=40,
            fmin=20.0, fmax=4000.0, center=False) + base.log_floor)

    features(batch, cfg), librosa_clip(batch[0])  # warm-up (caches, numba)
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        features(batch, cfg)
        bt.append((time.perf_counter() - t0) * 1000 / len(batch))
        t0 = time.perf_counter()
        for a in batch:
            librosa_clip(a)
        lt.append((time.perf_counter() - t0) * 1000 / len(batch))
    batch_ms = float(np.median(bt))
    librosa_ms = float(np.median(lt))

    # sparsity -------------------------------------------------------------
    spars = {}
    for name in sorted(ENCODERS):
        enc = make_encoder(name, cfg.n_features)
        spars[name] = {"sparsity": sparsity(np.concatenate([enc.encode(f) for f in feats])),
                       "n_out": enc.n_out, "substeps": enc.substeps,
                       "expected_sparsity": enc.expected_sparsity, "options": enc.to_dict()}

    mic = _mic_resampling(timed, (44100, 48000))

    us = stream_by_enc[args.encoder]
    result = {
        "stream_us_per_frame": us,
        "stream_encoder": args.encoder,
        "stream_us_per_frame_by_encoder": stream_by_enc,
        "stream_us_per_frame_frontend_only": frontend_only,
        "realtime_factor": 10000.0 / us,
        "target_us_per_frame": 50.0,
        "goal_us_per_frame": 20.0,
        "batch_ms_per_clip": batch_ms,
        "librosa_batch_ms_per_clip": librosa_ms,
        "batch_speedup_vs_librosa": librosa_ms / batch_ms,
        "max_abs_err_stream_vs_batch": err_stream,
        "max_abs_err_vs_librosa": err_librosa,
        "encoders": spars,
        "mic_resampling": mic,
        "n_clips": len(chosen),
        "n_timed_clips": len(timed),
        "repeats": args.repeats,
        "frontend_hash": base.hash(),
        "machine": f"{platform.machine()} {platform.python_implementation()} "
                   f"{platform.python_version()}, numpy {np.__version__}",
    }
    say(f"stream: {us:.1f} us/frame with {args.encoder} encoder "
        f"({frontend_only:.1f} frontend only; {10000 / us:.0f}x real time; target 50, goal 20)")
    say(f"batch: {batch_ms:.3f} ms/clip (librosa melspectrogram: {librosa_ms:.3f} ms/clip)")
    say(f"max |stream - batch| = {err_stream:.2e}, max |ours - librosa| = {err_librosa:.2e}")
    for rate, m in mic.items():
        say(f"mic at {rate} Hz: {m['us_per_10ms_block']:.1f} us per 10 ms block to 16 kHz, "
            f"a sample waits {m['hold_ms_median']:.1f} ms (max {m['hold_ms_max']:.1f}), "
            f"max |blocks - whole file| = {m['max_abs_err_vs_whole_file']:.1e}")
    for name, s in spars.items():
        say(f"  {name:<10} width {s['n_out']:4d}  substeps {s['substeps']}  "
            f"sparsity {s['sparsity']:.3f}")
    if args.json:
        print_json(result)
    return 0
