"""The firmware one PE runs: its SRAM layout and its handlers for each phase of a tick.

A `PEProgram` holds only its own SRAM arrays and sees the rest of the chip only
through the packets delivered to it (`receive`). It is driven by commands (`handle`),
the same way in one process and in a worker process, so the multi-process mode
runs this exact code.

SRAM layout of a PE owning n neurons (n_pre = n_in + n_rec), by region:
- code: the firmware's text (CODE_BYTES, +READOUT_CODE_BYTES on the readout PE)
- neuron_state: v, a, z, psi, psi_prev (n each, fp32); eps, eps_prev (n_pre each, fp32)
- weights: [W_in | W_rec] rows (n x n_pre) in the weight format
- eligibility: eps_a (ALIF), ebar (unless fused), acc (n x n_pre each) in the trace format
- optimizer: Adam m, v (n x n_pre) or momentum buffer, in their formats, plus Adam's t
- buffers: received input frame (n_in fp32), received spikes (n_rec bytes), learning
  signals (n fp32), outgoing spike keys (n uint32)
The readout PE adds W_out (+ B when feedback is random), y, sum_y, zbar, sum_zbar,
its optimizer state and, for the per_step loss, the W_out gradient accumulator.

Emulator-only scratch (not chip memory, documented in docs/emulator.md): float32
working copies of narrow-format arrays (the M4F widens on every load, we widen once
and round back after each kernel, which gives the same values), and index scratch.
"""

from __future__ import annotations

import numpy as np

from edgeprop.network import ModelConfig
from edgeprop.optim import MOMENTUM
from firmware_model import costs
from firmware_model.chip import PE, Sram
from firmware_model.kernels import (
    MODE_MEAN,
    N_NEUR_ROWS,
    mean_end_sample,
    pe_lsig_kernel,
    pe_step_kernel,
    readout_lsig_kernel,
    readout_step_kernel,
    round_fp16_array,
)
from firmware_model.optimizer_kernel import adam_store, sgd_store
from firmware_model.precision import Precision, Stored, alloc_stored
from firmware_model.router import INPUT, LSIG, OUTPUT, SPIKE, make_key

#: ESTIMATE: the e-prop neuron firmware (tick handler, packet handlers, eligibility,
#: gradient and Adam loops) as Thumb-2 code, ~1,000 instructions at ~3 bytes each.
CODE_BYTES = 3072
#: ESTIMATE: the readout's extra code (leaky units, softmax, learning signals).
READOUT_CODE_BYTES = 1024

class _Trace:
    """A per-synapse trace in SRAM (fp32 or fp16) and the float32 array kernels use.

    fp32: the kernels work on the SRAM array itself. fp16: they work on a float32
    array whose every value is an fp16 value (each store in the kernels rounds, as the
    firmware's VCVT store does); `flush` copies it into the fp16 SRAM array, exactly.
    """

    def __init__(self, sram: Sram, name: str, shape, fmt: str) -> None:
        self.stored = alloc_stored(sram, "eligibility", name, shape, fmt)
        self.half = fmt == "fp16"
        self.work = self.stored.q if fmt == "fp32" else np.zeros(shape, np.float32)

    def round(self) -> None:
        """After a NumPy-side update: round to what an fp16 store keeps."""
        if self.half:
            round_fp16_array(self.work)

    def flush(self) -> None:
        if self.half:
            self.stored.q[...] = self.work

    def zero(self) -> None:
        self.stored.zero()
        self.work[...] = 0.0


class PEProgram:
    """Firmware state and handlers of one PE (neurons [r0, r1), maybe the readout)."""

    def __init__(self, pe_id: int, cfg: ModelConfig, rows: tuple[int, int], readout: bool,
                 prec: Precision, loss: str, optimizer: str, lr: float, reg_coef: float,
                 target_rate: float, seed: int = 0) -> None:
        self.pe = PE(pe_id, Sram(pe_id))
        self._mark = 0
        self.cfg = cfg
        self.r0, self.r1 = rows
        self.n = n = self.r1 - self.r0
        self.is_readout = readout
        self.prec = prec
        self.mode = MODE_MEAN if loss == "mean" else 1
        self.optimizer = optimizer
        self.lr = float(lr)
        self.reg_coef = float(reg_coef)
        self.target_rate = float(target_rate)
        self.alif = cfg.neuron == "alif"
        self.rng = np.random.default_rng([seed, pe_id]) if prec.stochastic_rounding else None
        n_in, n_rec, n_pre, n_out = cfg.n_in, cfg.n_rec, cfg.n_in + cfg.n_rec, cfg.n_out
        self.n_in, self.n_rec, self.n_pre, self.n_out = n_in, n_rec, n_pre, n_out
        s = self.pe.sram
        s.reserve("code", "eprop firmware", CODE_BYTES + (READOUT_CODE_BYTES if readout else 0))
        self.neur = s.alloc("neuron_state", "neur", (N_NEUR_ROWS, n), np.float32)
        self.pre = s.alloc("neuron_state", "eps", (2, n_pre), np.float32)
        self.t_opt = s.alloc("optimizer", "t", (1,), np.int32)
        self.w = alloc_stored(s, "weights", "w", (n, n_pre), prec.weights)
        self.eps_a = _Trace(s, "eps_a", (n, n_pre), prec.traces) if self.alif else None
        self.ebar = None if prec.fused else _Trace(s, "ebar", (n, n_pre), prec.traces)
        self._acc_bufs = [_Trace(s, "acc", (n, n_pre), prec.traces)]
        self.acc: _Trace | None = self._acc_bufs[0]
        self.g_syn: _Trace | None = None
        self.opt_m = self.opt_v = None
        if optimizer == "adam":
            self.opt_m = alloc_stored(s, "optimizer", "m", (n, n_pre), prec.opt_m)
            self.opt_v = alloc_stored(s, "optimizer", "v", (n, n_pre), prec.opt_v,
                                      round_up=True)
        elif optimizer == "momentum":
            self.opt_m = alloc_stored(s, "optimizer", "buf", (n, n_pre), prec.opt_m)
        self.x_buf = s.alloc("buffers", "x_in", (n_in,), np.float32)
        self.zin = s.alloc("buffers", "spikes_in", (n_rec,), np.uint8)
        self.L = s.alloc("buffers", "lsig", (n,), np.float32)
        self.out_keys = s.alloc("buffers", "spike_keys_out", (n,), np.uint32)
        # emulator scratch
        self._w_c = np.zeros((n, n_pre), np.float32) if prec.weights != "fp32" else self.w.q
        self._w_in_c, self._w_rec_c = self._w_c[:, :n_in], self._w_c[:, n_in:]
        self._spk = np.zeros(n_rec, np.int64)
        self._spk_out = np.zeros(max(n, 1), np.int64)
        self._dummy = np.zeros((1, 1), np.float32)
        self._consts = np.array(
            [cfg.alpha, cfg.rho, cfg.kappa, cfg.beta_eff, cfg.v_th, cfg.gamma / cfg.v_th,
             reg_coef, target_rate], dtype=np.float32)
        self._diag = (np.arange(n), n_in + self.r0 + np.arange(n))
        self.fmt_w = costs.FORMAT_EXTRA[prec.weights]
        self.fmt_t = costs.FORMAT_EXTRA[prec.traces]
        C = costs.CYCLES
        self._elig_cyc = C[costs.elig_kernel(cfg.neuron, prec.fused)]
        self._n_trace_arrays = int(self.alif) + int(not prec.fused) + 1
        self._tick_fixed = (C["tick_overhead"] + C["neuron_update"] * n
                            + (C["input_mac"] + self.fmt_w) * n * n_in
                            + C["eps_vector"] * n_pre)
        self._spike_key_base = np.uint32(make_key(SPIKE, pe_id, self.r0))
        if readout:
            self._init_readout(s)

    def _init_readout(self, s: Sram) -> None:
        cfg, prec = self.cfg, self.prec
        n_rec, n_out = self.n_rec, self.n_out
        self.w_out = alloc_stored(s, "weights", "w_out", (n_out, n_rec), prec.weights)
        self.fb_random = None
        if cfg.feedback == "random":
            self.fb_random = s.alloc("weights", "b_fb_T", (n_out, n_rec), np.float32)
        self.y = s.alloc("neuron_state", "y", (n_out,), np.float32)
        self.sum_y = s.alloc("neuron_state", "sum_y", (n_out,), np.float32)
        self.zbar = s.alloc("neuron_state", "zbar", (n_rec,), np.float32)
        self.sum_zbar = s.alloc("neuron_state", "sum_zbar", (n_rec,), np.float32)
        self.stats = s.alloc("neuron_state", "stats", (4,), np.float64)
        self.L_all = s.alloc("buffers", "lsig_out", (n_rec,), np.float32)
        if self.mode == MODE_MEAN:
            self.out_acc = s.alloc("buffers", "out_grad", (n_out, n_rec), np.float32)
        else:
            self.out_acc = s.alloc("eligibility", "out_acc", (n_out, n_rec), np.float32)
        self.out_m = self.out_v = None
        if self.optimizer == "adam":
            self.out_m = alloc_stored(s, "optimizer", "m_out", (n_out, n_rec), prec.opt_m)
            self.out_v = alloc_stored(s, "optimizer", "v_out", (n_out, n_rec), prec.opt_v,
                                      round_up=True)
        elif self.optimizer == "momentum":
            self.out_m = alloc_stored(s, "optimizer", "buf_out", (n_out, n_rec), prec.opt_m)
        self._w_out_c = (np.zeros((n_out, n_rec), np.float32) if prec.weights != "fp32"
                         else self.w_out.q)
        self.n_samples = 0
        self._zin_ro = np.zeros(n_rec, np.float32)
        self._out_keys = np.asarray(make_key(OUTPUT, self.pe.pe_id, np.arange(n_out)), np.uint32)
        self._lsig_keys = np.asarray(make_key(LSIG, self.pe.pe_id, np.arange(n_rec)), np.uint32)

    # ------------------------------------------------------------------ helpers
    def _charge(self, cycles: float) -> int:
        c = int(round(cycles))
        self.pe.counters.cycles += c
        return c

    def _fb(self) -> np.ndarray:
        return self._w_out_c if self.fb_random is None else self.fb_random

    def _refresh_weights(self) -> None:
        if self.prec.weights != "fp32":
            self._w_c[...] = self.w.read()
            if self.is_readout:
                self._w_out_c[...] = self.w_out.read()

    def _traces(self) -> list[_Trace]:
        return [t for t in (self.eps_a, self.ebar, *self._acc_bufs) if t is not None]

    def handle(self, cmd: str, args: dict):
        """Run one command; returns (result, cycles spent since the last report).

        Cycles of packets received before the command (interrupts) are included, so a
        phase's cost on this PE is everything it did since the previous phase.
        """
        res = getattr(self, "cmd_" + cmd)(**args)
        return res, self.take_cycles()

    # ------------------------------------------------------------------ packets
    def receive(self, keys: np.ndarray, payloads: np.ndarray, kind: int = -1,
                idx: np.ndarray | None = None) -> None:
        """Interrupt handler: input frames, spikes and learning signals into buffers.

        `kind` >= 0 says the router found one packet kind in the batch (a shortcut for
        the dispatch the handler does per packet on the chip).
        """
        n = int(keys.size)
        if n == 0:
            return
        c = self.pe.counters
        c.cycles += costs.CYCLES["packet_recv"] * n
        c.packets_received += n
        if idx is None:
            idx = keys & np.uint32(0xFFFF)
        if kind >= 0:
            self._receive_kind(kind, idx, payloads)
            return
        kinds = keys >> np.uint32(28)
        for kd in np.unique(kinds):
            m = kinds == kd
            self._receive_kind(int(kd), idx[m], payloads[m])

    def _receive_kind(self, kind: int, idx: np.ndarray, payloads: np.ndarray) -> None:
        if kind == INPUT:
            self.x_buf[idx] = payloads.view(np.float32)
        elif kind == SPIKE:
            self.zin[idx] = 1
        elif kind == LSIG:
            self.L[idx - self.r0] = payloads.view(np.float32)

    def _send(self, keys: np.ndarray, payloads: np.ndarray | None = None):
        n = int(keys.size)
        self.pe.counters.packets_sent += n
        if payloads is None:
            payloads = np.zeros(n, np.uint32)
        else:
            self.pe.counters.payload_bytes_sent += 4 * n
        self._charge(costs.CYCLES["packet_send"] * n)
        return keys, payloads

    # ------------------------------------------------------------------ commands
    def cmd_load(self, w_rows: np.ndarray, w_out=None, b_fb_T=None) -> None:
        self.w.write(w_rows)
        self.w.q[self._diag] = 0
        if self.is_readout:
            self.w_out.write(w_out)
            if self.fb_random is not None:
                self.fb_random[...] = b_fb_T
        self._refresh_weights()

    def cmd_reset(self) -> None:
        self.neur[...] = 0.0
        self.pre[...] = 0.0
        self.zin[...] = 0
        self.x_buf[...] = 0.0
        for tr in (self.eps_a, self.ebar):
            if tr is not None:
                tr.zero()
        if self.mode == MODE_MEAN and self.acc is not None:
            self.acc.zero()
        if self.is_readout:
            self.y[...] = 0.0
            self.zbar[...] = 0.0
            self._start_sample_counters()

    def _start_sample_counters(self) -> None:
        self.sum_zbar[...] = 0.0
        self.sum_y[...] = 0.0
        self.stats[:3] = 0.0

    def _ensure_acc(self) -> _Trace:
        if self.acc is None:
            free = [b for b in self._acc_bufs if b is not self.g_syn]
            if not free:
                k = len(self._acc_bufs)
                free = [_Trace(self.pe.sram, f"acc{k}", (self.n, self.n_pre), self.prec.traces)]
                self._acc_bufs += free
            self.acc = free[0]
            self.acc.zero()
        return self.acc

    def tick_arrays(self) -> tuple:
        """The arrays one tick touches (for the batched single-process path)."""
        acc = self._ensure_acc()
        eps_a = self.eps_a.work if self.eps_a is not None else self._dummy
        ebar = self.ebar.work if self.ebar is not None else self._dummy
        return (self.x_buf, self.zin, self._w_in_c, self._w_rec_c, self.neur, self.pre,
                eps_a, ebar, acc.work, self._spk, self._spk_out)

    def cmd_tick(self):
        """Neuron update, spikes out, eligibility update (phase 1 of a tick)."""
        xb, zin, w_in, w_rec, neur, pre, eps_a, ebar, acc, spk, spk_out = self.tick_arrays()
        n_spk, active, n_rx = pe_step_kernel(
            xb, zin, w_in, w_rec, neur, pre, eps_a, ebar, acc, self._consts, spk, spk_out,
            self.mode, self.alif, self.prec.fused, self.acc.half)
        return self.tick_done(n_spk, active, n_rx), None

    def tick_cycles(self, n_spk, active, n_rx):
        """Cycles of one tick from its counts (ints, or integer arrays over ticks)."""
        C = costs.CYCLES
        n, n_pre, ft = self.n, self.n_pre, self.fmt_t
        return (self._tick_fixed + (C["rec_add"] + self.fmt_w) * n * n_rx
                + (self._elig_cyc + 2 * self._n_trace_arrays * ft) * active * n_pre
                + (C["elig_skip"] + 2 * self._n_trace_arrays * ft) * (n - active) * n_pre
                + C["packet_send"] * n_spk)

    def tick_done(self, n_spk: int, active: int, n_rx: int) -> np.ndarray:
        """Charge the tick's cycles and form its spike packets' keys."""
        counters = self.pe.counters
        counters.cycles += self.tick_cycles(n_spk, active, n_rx)
        counters.packets_sent += n_spk
        if n_spk == 0:
            return self.out_keys[:0].copy()
        keys = self.out_keys[:n_spk]  # the outgoing packet queue in SRAM
        keys[:] = self._spk_out[:n_spk]
        keys += self._spike_key_base
        return keys.copy()

    def take_cycles(self) -> int:
        c = self.pe.counters.cycles - self._mark
        self._mark = self.pe.counters.cycles
        return c

    def cmd_readout(self, target: int = -1):
        """Readout PE, after the tick's spikes arrived: y[t] out; per_step: L[t] out."""
        zin = self._zin_ro
        zin[...] = self.zin
        kappa = self._consts[2]
        n_spk = readout_step_kernel(zin, self._w_out_c, self.y, self.sum_y, self.zbar,
                                    self.sum_zbar, kappa, self._spk)
        self.stats[0] += 1.0
        C = costs.CYCLES
        cyc = self.readout_cycles(n_spk)
        out = [self._send(self._out_keys, self.y.view(np.uint32).copy())]
        any_l = False
        if self.mode != MODE_MEAN:
            any_l = readout_lsig_kernel(self.y, self._fb(), self.zbar, self.sum_zbar,
                                        self.out_acc, self.L_all, self._consts, self.stats,
                                        int(target))
            if target >= 0:
                cyc += C["softmax_unit"] * self.n_out + 2 * C["lsig_mac"] * self.n_out * self.n_rec
            if any_l:
                cyc += C["lsig_mac"] * self.n_rec
                out.append(self._send(self._lsig_keys, self.L_all.view(np.uint32).copy()))
        self._charge(cyc)
        keys = np.concatenate([k for k, _ in out])
        pays = np.concatenate([p for _, p in out])
        return keys, pays, self.y.copy(), bool(any_l)

    def readout_cycles(self, n_spk):
        """Cycles of the readout's update over n_spk received spikes (int or array)."""
        C = costs.CYCLES
        return (C["readout_unit"] * self.n_out + C["readout_zbar"] * self.n_rec
                + (C["readout_add"] + self.fmt_w) * n_spk * self.n_out)

    def cmd_lsig(self) -> None:
        """per_step loss: acc += L ebar with the learning signals just received."""
        acc = self._ensure_acc()
        rows = pe_lsig_kernel(self.L, self.ebar.work, acc.work, acc.half)
        self._charge((costs.CYCLES["grad_accum_step"] + 3 * self.fmt_t) * rows * self.n_pre)

    def cmd_end_sample(self, label):
        """Readout PE: loss, logits; mean loss: per-neuron gradient coefficients out."""
        T = self.stats[0]
        ybar = self.sum_y.astype(np.float64) / T
        logits = ybar.astype(np.float32)
        self.n_samples += 1
        if self.mode != MODE_MEAN:
            n_lab, ce = self.stats[1], self.stats[2]
            loss = ce / n_lab if n_lab else float("nan")
            self._start_sample_counters()
            return float(loss), logits, None
        loss, d, coef, zmean, _ = mean_end_sample(
            self.sum_y, self.sum_zbar, self._fb(), T, int(label), self.cfg.kappa,
            self.reg_coef, self.target_rate)
        if self.prec.fused:
            # sum_t ebar[t] ~= sum_t e[t] / (1 - kappa) (filter tail of the last steps dropped)
            coef = (coef / np.float32(1.0 - self.cfg.kappa)).astype(np.float32)
        self.out_acc += np.outer(d, zmean).astype(np.float32)
        self._start_sample_counters()
        C = costs.CYCLES
        # double precision on the M4F is soft-float: ESTIMATE 20 cycles per multiply-add
        self._charge(C["softmax_unit"] * self.n_out * 20 + 20 * self.n_rec * self.n_out * 2)
        keys = make_key(LSIG, self.pe.pe_id, np.arange(self.n_rec))
        return float(loss), logits, self._send(np.asarray(keys, np.uint32),
                                              coef.view(np.uint32).copy())

    def cmd_finish_sample(self) -> None:
        """Mean loss, after the coefficients arrived: S becomes this sample's gradient."""
        if self.mode != MODE_MEAN:
            return
        acc = self._ensure_acc()
        coef = self.L[:, None]
        if self.g_syn is None:
            acc.work *= coef
            acc.round()
            self.g_syn, self.acc = acc, None
        else:
            self.g_syn.work += coef * acc.work
            self.g_syn.round()
            acc.zero()
        self._charge((costs.CYCLES["grad_scale"] + 2 * self.fmt_t) * self.n * self.n_pre)

    def _grad_rows(self, scale: float) -> np.ndarray:
        if self.mode == MODE_MEAN:
            syn = self.g_syn.work if self.g_syn is not None else np.zeros((self.n, self.n_pre),
                                                                          np.float32)
        else:
            syn = self._ensure_acc().work
        g = syn * np.float32(scale)
        g[self._diag] = 0.0
        return g

    def cmd_grads(self, scale: float):
        out = {"rows": self._grad_rows(scale)}
        if self.is_readout:
            out["w_out"] = self.out_acc * np.float32(scale)
        return out

    def _opt_step(self, w: Stored, g: np.ndarray, m: Stored | None, v: Stored | None,
                  t: int) -> None:
        if self.optimizer == "adam":
            adam_store(w, g, m, v, t, self.lr, self.rng)
        else:  # m is the momentum buffer, None for plain SGD
            sgd_store(w, g, m, self.lr, MOMENTUM, self.rng)

    def cmd_apply(self, scale: float) -> None:
        """Optimizer step on this PE's rows (and W_out on the readout PE); zero the grads."""
        self.t_opt[0] += 1
        t = int(self.t_opt[0])
        self._opt_step(self.w, self._grad_rows(scale), self.opt_m, self.opt_v, t)
        self.w.q[self._diag] = 0
        kind = self.optimizer  # its cycles; formats only of the buffers it keeps
        kept = {"adam": (self.prec.opt_m, self.prec.opt_v), "momentum": (self.prec.opt_m,),
                "sgd": ()}[kind]
        fmt_o = sum(costs.FORMAT_EXTRA[f] for f in kept)
        self._charge((costs.CYCLES[kind] + 2 * (fmt_o + self.fmt_w)) * self.n * self.n_pre)
        if self.is_readout:
            g_out = self.out_acc * np.float32(scale)
            self._opt_step(self.w_out, g_out, self.out_m, self.out_v, t)
            self.out_acc[...] = 0.0
            self.n_samples = 0
            self.stats[3] = 0.0
            self._charge((costs.CYCLES[kind] + 2 * (fmt_o + self.fmt_w)) * self.n_out * self.n_rec)
        self._refresh_weights()
        if self.mode == MODE_MEAN:
            if self.g_syn is not None:
                if self.acc is None:
                    self.g_syn.zero()
                    self.acc = self.g_syn
                self.g_syn = None
        elif self.acc is not None:
            self.acc.zero()

    # ------------------------------------------------------------------ state I/O
    def cmd_read_params(self):
        out = {"rows": self.w.read().copy()}
        if self.is_readout:
            out["w_out"] = self.w_out.read().copy()
            out["stats"] = self.stats.copy()
            out["n_samples"] = self.n_samples
        return out

    def cmd_read_state(self):
        out = {"v": self.neur[0].copy(), "a": self.neur[1].copy(), "z": self.neur[2].copy()}
        if self.is_readout:
            out["y"] = self.y.copy()
        return out

    def cmd_opt_state(self):
        out = {"t": int(self.t_opt[0])}
        for name, st in (("m", self.opt_m), ("v", self.opt_v)):
            if st is not None:
                out[name] = st.read().copy()
        if self.is_readout:
            for name, st in (("m_out", self.out_m), ("v_out", self.out_v)):
                if st is not None:
                    out[name] = st.read().copy()
        return out

    def cmd_load_opt_state(self, state: dict) -> None:
        self.t_opt[0] = int(state["t"])
        for name, st in (("m", self.opt_m), ("v", self.opt_v)):
            if st is not None and name in state:
                st.write(state[name])
        if self.is_readout:
            for name, st in (("m_out", self.out_m), ("v_out", self.out_v)):
                if st is not None and name in state:
                    st.write(state[name])

    def cmd_counters(self):
        for tr in self._traces():
            tr.flush()
        c = self.pe.counters
        return {"cycles": c.cycles, "packets_sent": c.packets_sent,
                "packets_received": c.packets_received, "payload_bytes_sent": c.payload_bytes_sent,
                "bytes_by_region": self.pe.sram.bytes_by_region()}
