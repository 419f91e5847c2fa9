"""EmulatedLearner: e-prop on the emulated chip, interchangeable with EpropLearner.

One timer tick (network step t), every phase a barrier across PEs:

1. host -> chip: the frame x[t] as n_in payload packets (multicast to every PE);
2. every PE: neuron update, spikes z[t] out as packets, eligibility update (`tick`);
3. the router delivers the spikes; the readout PE updates y[t] and sends it to the
   host (n_out payload packets); with the per_step loss it also sends the learning
   signals L[t] (one payload packet per neuron) to their owners;
4. per_step loss only: every PE adds L_j ebar_ji to its accumulator.

At the end of a sample the readout PE sends each neuron's gradient coefficient, and
every PE turns its accumulator into its gradient rows; `apply` runs each PE's
optimizer on its own rows. The host never touches a PE's memory: parameters, grads
and optimizer state are gathered by commands, as a host would read SRAM over the
chip's links.
"""

from __future__ import annotations

import time

import numpy as np

from edgeprop.bptt import Grads
from edgeprop.eprop import check_param_shapes, sample_targets
from edgeprop.errors import CheckpointError, ConfigError
from edgeprop.network import DTYPE, ModelConfig, Params, State
from edgeprop.optim import (
    OPTIMIZER_KINDS,
    check_state_for,
    make_optimizer,
)
from firmware_model import costs
from firmware_model.chip import PE_SRAM_BYTES, REGIONS, Chip
from firmware_model.mapping import Mapping, emitted_keys, map_network
from firmware_model.multiproc import LocalGroups, ProcessGroups, build_programs
from firmware_model.precision import DEFAULT_PRECISION, get_precision
from firmware_model.router import HOST_ID, INPUT, OUTPUT, SPIKE, key_index, key_kind, make_key


class EmulatedLearner:
    """Same methods and semantics as `edgeprop.eprop.EpropLearner`, run on emulated PEs."""

    def __init__(self, cfg: ModelConfig, params: Params, *, n_pes: int = 12, loss: str = "mean",
                 optimizer: str = "adam", lr: float = 1e-3, reg_coef: float = 0.0,
                 target_rate: float = 0.02, precision: str = DEFAULT_PRECISION,
                 clock_mhz: float = costs.DEFAULT_CLOCK_MHZ, multiprocess: bool = False,
                 seed: int = 0) -> None:
        if loss not in ("mean", "per_step"):
            raise ConfigError(f"loss must be 'mean' or 'per_step', got {loss!r}")
        if optimizer not in ("adam", "sgd", "momentum"):
            raise ConfigError(f"optimizer must be 'adam', 'sgd' or 'momentum', got {optimizer!r}")
        if not lr > 0:
            raise ConfigError(f"learning rate must be > 0, got {lr}")
        if reg_coef < 0:
            raise ConfigError(f"reg_coef must be >= 0, got {reg_coef}")
        prec = get_precision(precision)
        if prec.fused and loss != "mean":
            raise ConfigError(f"precision {prec.name!r} (fused traces) needs loss='mean'")
        check_param_shapes(cfg, params)
        self.cfg = cfg
        self.loss, self.optimizer, self.lr = loss, optimizer, float(lr)
        self.reg_coef, self.target_rate = float(reg_coef), float(target_rate)
        self.precision = prec
        self.chip = Chip(n_pes, clock_mhz)
        self.mapping: Mapping = map_network(cfg, self.chip.n_pes)
        self.router = self.mapping.router
        self.readout_pe = self.mapping.readout_pe
        self.multiprocess = bool(multiprocess)
        self._spec = {"cfg": cfg.to_dict(), "precision": prec,  # (a custom one too)
                      "slices": self.mapping.slices, "readout_pe": self.readout_pe,
                      "loss": loss, "optimizer": optimizer, "lr": self.lr,
                      "reg_coef": self.reg_coef, "target_rate": self.target_rate, "seed": seed}
        self._groups = [g for _, g in sorted(self.chip.qpes().items())]
        self._group_of = {p: gi for gi, g in enumerate(self._groups) for p in g}
        self._b_fb = np.array(params.b_fb, dtype=DTYPE, copy=True)
        if self.multiprocess:
            build_programs(self._spec, list(range(self.chip.n_pes)))  # fit check, here
            self._exec = ProcessGroups(self._spec, self._groups)
        else:
            self._exec = LocalGroups(self._spec, self._groups)
        self._pending: dict[int, list] = {}
        self._host_rx: list[tuple[np.ndarray, np.ndarray]] = []
        self._all = {p: {} for p in range(self.chip.n_pes)}
        self._in_keys = np.asarray(make_key(INPUT, HOST_ID, np.arange(cfg.n_in)), np.uint32)
        self._n_samples = 0
        self._n_lab_since_apply = 0.0
        self.last_logits = np.zeros(cfg.n_out, DTYPE)
        self._sample_routes = None if self.multiprocess or loss != "mean" else \
            self._multicast_routes()
        self._reset_profile()
        self._load(params)
        self.reset()

    # ------------------------------------------------------------------ plumbing
    def _route(self, keys: np.ndarray, pays: np.ndarray) -> None:
        for t, batch in enumerate(self.router.deliver(keys, pays)):
            if batch[0].size == 0:
                continue
            if t == self.router.host:
                self._host_rx.append(batch[:2])
            else:
                self._pending.setdefault(t, []).append(batch)

    def _call(self, cmd: str, args_by_pe: dict[int, dict]) -> tuple[dict, np.ndarray]:
        """Deliver pending packets to the involved groups, run `cmd`; (results, cycles/PE)."""
        deliver = {}
        if self._pending:
            involved = {self._group_of[p] for p in args_by_pe}
            deliver = {p: b for p, b in self._pending.items() if self._group_of[p] in involved}
            for p in deliver:
                del self._pending[p]
        res = self._exec.call(cmd, args_by_pe, deliver)
        cyc = np.zeros(self.chip.n_pes, np.int64)
        for p, (_, c) in res.items():
            cyc[p] = c
        return {p: r for p, (r, _) in res.items()}, cyc

    def load_params(self, params: Params) -> None:
        """Write weights into the PEs' SRAM (quantised to the storage format; the W_rec
        diagonal is zeroed); optimizer state, traces and gradients are kept."""
        check_param_shapes(self.cfg, params, ("w_in", "w_rec", "w_out"))
        self._load(params)

    def _load(self, params: Params) -> None:
        w = np.concatenate([np.asarray(params.w_in, DTYPE), np.asarray(params.w_rec, DTYPE)], 1)
        args = {}
        for p, (s, e) in enumerate(self.mapping.slices):
            a = {"w_rows": w[s:e].copy()}
            if p == self.readout_pe:
                a["w_out"] = np.asarray(params.w_out, DTYPE).copy()
                if self.cfg.feedback == "random":
                    a["b_fb_T"] = np.ascontiguousarray(self._b_fb.T)
            args[p] = a
        self._call("load", args)

    def _multicast_routes(self):
        """(input to, spikes to, deliveries per input packet, per spike) when every input
        packet goes to one set of PEs, every spike to one set, and outputs only to the
        host: what `train_sample`'s one-call path needs. None otherwise."""
        n_pes, host = self.chip.n_pes, self.router.host
        *spikes, inputs, _lsig, outputs = emitted_keys(self.mapping)
        sets = []
        for keys in (inputs, np.concatenate(spikes), outputs):
            dest = self.router.route(keys)
            if not (dest == dest[0]).all():
                return None
            sets.append(dest[0])
        d_in, d_spk, d_out = sets
        if d_in[host] or d_spk[host] or d_out[:n_pes].any() or not d_out[host]:
            return None
        return d_in[:n_pes].copy(), d_spk[:n_pes].copy(), int(d_in.sum()), int(d_spk.sum())

    @property
    def trains_in_one_call(self) -> bool:
        """True when `train_sample` runs the sample's steps in one kernel call (mean
        loss, single process, multicast input and spikes); else it steps frame by frame."""
        return self._sample_routes is not None

    # ------------------------------------------------------------------ profile counters
    def _reset_profile(self) -> None:
        self._queued_steps: list[tuple] = []
        self._steps = 0
        self._step_time_sum = 0.0
        self._step_time_max = 0.0
        self._step_energy_sum = 0.0
        self._end_time_sum = 0.0
        self._end_energy_sum = 0.0
        self._ends = 0
        self._wall_steps = 0.0
        self.router.reset_counters()

    def _close_step(self, phase_cycles: list[np.ndarray], packets: int, deliveries: int) -> None:
        """Queue one step's cost for the profile; `_close_steps` sums queued steps in
        batches (one vectorised pass instead of a dozen small NumPy calls per step)."""
        q = self._queued_steps
        q.append((sum(phase_cycles), sum(int(c.max()) for c in phase_cycles),
                  len(phase_cycles), packets, deliveries))
        if len(q) >= 256:
            self._flush_steps()

    def _flush_steps(self) -> None:
        q = self._queued_steps
        if q:
            columns = [np.array(v) for v in zip(*q, strict=True)]
            q.clear()
            self._close_steps(*columns)

    def _close_steps(self, per_pe: np.ndarray, critical: np.ndarray, phases, packets,
                     deliveries) -> None:
        """Add T steps to the profile: per_pe (T, n_pes) cycles of each step, critical (T,)
        the sum over its phases of the slowest PE's cycles, phases, packets and deliveries
        per step (scalars or (T,))."""
        clock = self.chip.clock_mhz
        t_us = critical / clock + phases * costs.ROUTE_PHASE_US
        energy = costs.energy_uj(per_pe, packets, deliveries, clock, costs.STEP_BUDGET_US)
        for tu, e in zip(t_us.tolist(), energy.tolist(), strict=True):
            self._step_time_sum += tu
            self._step_energy_sum += e
        self._step_time_max = max(self._step_time_max, float(t_us.max()))
        self._steps += t_us.size

    # ------------------------------------------------------------------ API
    @property
    def params(self) -> Params:
        """A Params gathered from the PEs' SRAM (dequantised to float32)."""
        res, _ = self._call("read_params", self._all)
        w = np.concatenate([res[p]["rows"] for p in range(self.chip.n_pes)], axis=0)
        ni = self.cfg.n_in
        return Params(np.ascontiguousarray(w[:, :ni]), np.ascontiguousarray(w[:, ni:]),
                      res[self.readout_pe]["w_out"], self._b_fb.copy())

    @property
    def state(self) -> State:
        """Neuron state (v, a, z, y) gathered from the PEs (copies)."""
        res, _ = self._call("read_state", self._all)
        cat = lambda k: np.concatenate([res[p][k] for p in range(self.chip.n_pes)])
        return State(cat("v"), cat("a"), cat("z"), res[self.readout_pe]["y"])

    def state_nbytes(self) -> dict[str, int]:
        """Chip SRAM bytes by region, summed over PEs (EpropLearner.state_nbytes's role)."""
        return dict(self.memory()["by_region"])

    def reset(self) -> None:
        """New sample: neuron state, traces and this sample's sums cleared on every PE."""
        self._pending.clear()
        self._host_rx.clear()
        self._t_sample = 0
        self._call("reset", self._all)

    def step(self, x: np.ndarray, target: int | None = None) -> np.ndarray:
        """One frame through the chip; returns y[t] as received on the host link."""
        x = np.ascontiguousarray(x, dtype=DTYPE)
        if x.shape != (self.cfg.n_in,):
            raise ConfigError(f"x must have shape ({self.cfg.n_in},), got {x.shape}")
        t = -1 if target is None or self.loss == "mean" else int(target)
        if t >= self.cfg.n_out:
            raise ConfigError(f"target {t} out of range [0, {self.cfg.n_out})")
        w0 = time.perf_counter()
        p0, d0 = self.router.packets_routed, self.router.deliveries
        self._route(self._in_keys, x.view(np.uint32))
        res, c_tick = self._call("tick", self._all)
        phases = [c_tick]
        keys = np.concatenate([res[p][0] for p in range(self.chip.n_pes)])
        self._route(keys, np.zeros(keys.size, np.uint32))
        r = self.readout_pe
        res, c_ro = self._call("readout", {r: {"target": t}})
        out = res[r]
        phases.append(c_ro)
        self._route(out[0], out[1])
        y = self._take_outputs()
        if out[3]:
            _, c_l = self._call("lsig", self._all)
            phases.append(c_l)
            if t >= 0:
                self._n_lab_since_apply += 1
        self._t_sample += 1
        self._close_step(phases, self.router.packets_routed - p0, self.router.deliveries - d0)
        self._wall_steps += time.perf_counter() - w0
        return y

    def _take_outputs(self) -> np.ndarray:
        y = np.zeros(self.cfg.n_out, DTYPE)
        for k, p in self._host_rx:
            m = key_kind(k) == OUTPUT
            y[key_index(k[m])] = p[m].view(np.float32)
        self._host_rx.clear()
        return y

    def end_sample(self, label: int | None = None) -> float:
        """Close the sample (mean loss: gradients formed on every PE). Returns its loss."""
        r = self.readout_pe
        if self.loss == "mean" and (label is None or not 0 <= int(label) < self.cfg.n_out):
            raise ConfigError(f"mean loss needs a label in [0, {self.cfg.n_out}), got {label!r}")
        if self._t_sample == 0:
            raise ConfigError("end_sample() called before any step of the sample")
        p0, d0 = self.router.packets_routed, self.router.deliveries
        res, c_end = self._call("end_sample", {r: {"label": label}})
        loss, logits, pkts = res[r]
        phases = [c_end]
        if pkts is not None:
            self._route(*pkts)
            _, c_fin = self._call("finish_sample", self._all)
            phases.append(c_fin)
        self._t_sample = 0
        self._close_end(phases, self.router.packets_routed - p0, self.router.deliveries - d0)
        self.last_logits = logits
        self._n_samples += 1
        return float(loss)

    def _close_end(self, phase_cycles, packets, deliveries) -> None:
        cost = costs.StepCost([int(c) for c in np.sum(phase_cycles, axis=0)], packets,
                              deliveries, len(phase_cycles), self.chip.clock_mhz)
        self._ends += 1
        self._end_time_sum += sum(int(c.max()) for c in phase_cycles) / self.chip.clock_mhz \
            + len(phase_cycles) * costs.ROUTE_PHASE_US
        self._end_energy_sum += cost.energy_uj(None)

    def train_sample(self, x_seq: np.ndarray, label) -> tuple[float, np.ndarray]:
        """reset; step over x_seq (T, n_in); end_sample. Returns (loss, mean readout)."""
        xs = np.ascontiguousarray(x_seq, dtype=DTYPE)
        if xs.ndim != 2 or xs.shape[1] != self.cfg.n_in or xs.shape[0] < 1:
            raise ConfigError(f"x_seq must have shape (T, {self.cfg.n_in}), got {xs.shape}")
        targets = sample_targets(label, xs.shape[0], self.cfg.n_out, self.loss == "per_step")
        self.reset()
        if self._sample_routes is not None:
            self._steps_in_one_call(xs)
        else:
            for t in range(xs.shape[0]):
                self.step(xs[t], int(targets[t]) if targets[t] >= 0 else None)
        loss = self.end_sample(label if self.loss == "mean" else None)
        return loss, self.last_logits.copy()

    def _steps_in_one_call(self, xs: np.ndarray) -> None:
        """`step` over every frame of a mean-loss sample, as one kernel call on the PEs.

        Same weights, traces, packets, cycles and profile as stepping frame by frame
        (tests/test_emulator_equivalence.py); the per-frame outputs are not sent back
        one by one, which train_sample never returns. Saves the per-step Python
        dispatch, which dominated the emulator's wall time.
        """
        w0 = time.perf_counter()
        x_to, spikes_to, d_in, d_spk = self._sample_routes
        c_tick, c_ro, spikes = self._exec.run_sample(xs, x_to, spikes_to, self.readout_pe)
        T = xs.shape[0]
        n_in, n_out = self.cfg.n_in, self.cfg.n_out
        # outputs go to the host alone: one delivery each
        self.router.count(INPUT, n_in * T, n_in * d_in * T)
        self.router.count(SPIKE, spikes.sum(), spikes.sum() * d_spk)
        self.router.count(OUTPUT, n_out * T, n_out * T)
        self._flush_steps()  # keep the steps in order
        self._close_steps(c_tick + c_ro, c_tick.max(axis=1) + c_ro.max(axis=1), 2,
                          n_in + spikes + n_out, n_in * d_in + spikes * d_spk + n_out)
        self._t_sample = T
        self._wall_steps += time.perf_counter() - w0

    def _grad_scale(self) -> float:
        if self.loss == "mean":
            return 1.0 / self._n_samples if self._n_samples else 0.0
        n_lab = self._n_lab_since_apply
        return 1.0 / n_lab if n_lab else (1.0 if self.reg_coef else 0.0)

    def grads(self) -> Grads:
        """Gradients gathered from the PEs, normalised like EpropLearner.grads()."""
        res, _ = self._call("grads", {p: {"scale": self._grad_scale()} for p in self._all})
        g = np.concatenate([res[p]["rows"] for p in range(self.chip.n_pes)], axis=0)
        ni = self.cfg.n_in
        return Grads(w_in=np.ascontiguousarray(g[:, :ni]), w_rec=np.ascontiguousarray(g[:, ni:]),
                     w_out=res[self.readout_pe]["w_out"])

    def apply(self) -> None:
        """Every PE runs its optimizer on its rows; the readout PE on W_out."""
        if self._n_samples == 0 and self._n_lab_since_apply == 0 and not (
            self.loss == "per_step" and self.reg_coef
        ):
            return
        _, c = self._call("apply", {p: {"scale": self._grad_scale()} for p in self._all})
        self._end_time_sum += int(c.max()) / self.chip.clock_mhz
        self._end_energy_sum += costs.StepCost([int(v) for v in c], 0, 0, 0,
                                               self.chip.clock_mhz).energy_uj(None)
        self._n_samples = 0
        self._n_lab_since_apply = 0.0

    def optimizer_state(self) -> dict:
        """EpropLearner/edgeprop.optim layout: m.i / v.i per matrix (w_in, w_rec, w_out)."""
        res, _ = self._call("opt_state", self._all)
        d: dict = {"kind": OPTIMIZER_KINDS[self.optimizer], "t": float(res[0]["t"]),
                   **self._hyper()}
        ni = self.cfg.n_in
        for slot, rows_key, out_key in self._slots():
            w = np.concatenate([res[p][rows_key] for p in range(self.chip.n_pes)], axis=0)
            d[f"{slot}.0"] = np.ascontiguousarray(w[:, :ni])
            d[f"{slot}.1"] = np.ascontiguousarray(w[:, ni:])
            d[f"{slot}.2"] = res[self.readout_pe][out_key]
        return d

    def _slots(self) -> tuple:
        """(state slot, per-PE row key, readout key) of each of this optimizer's buffers."""
        return {"adam": (("m", "m", "m_out"), ("v", "v", "v_out")),
                "momentum": (("buf", "m", "m_out"),), "sgd": ()}[self.optimizer]

    def _hyper(self) -> dict:
        """The hyperparameters edgeprop.optim stores beside this optimizer's state: the
        host optimizer of the same name's own (its PEs run the same arithmetic)."""
        return make_optimizer(self.optimizer, self.lr).hyperparameters()

    def load_optimizer_state(self, d: dict) -> None:
        t = check_state_for(d, OPTIMIZER_KINDS[self.optimizer], self._hyper())
        args = {p: {"state": {"t": t}} for p in self._all}
        cfg = self.cfg
        for slot, rows_key, out_key in self._slots():
            try:
                a0 = np.asarray(d[f"{slot}.0"], DTYPE)
                a1 = np.asarray(d[f"{slot}.1"], DTYPE)
                a2 = np.asarray(d[f"{slot}.2"], DTYPE)
            except KeyError as exc:
                raise CheckpointError(f"optimizer state lacks {exc}") from None
            if (a0.shape, a1.shape, a2.shape) != ((cfg.n_rec, cfg.n_in), (cfg.n_rec, cfg.n_rec),
                                                  (cfg.n_out, cfg.n_rec)):
                raise CheckpointError("optimizer state shapes do not match the model")
            w = np.concatenate([a0, a1], axis=1)
            for p, (s, e) in enumerate(self.mapping.slices):
                args[p]["state"][rows_key] = w[s:e].copy()
            args[self.readout_pe]["state"][out_key] = a2.copy()
        self._call("load_opt_state", args)

    def memory(self) -> dict:
        res, _ = self._call("counters", self._all)
        per_pe = [res[p]["bytes_by_region"] for p in range(self.chip.n_pes)]
        totals = {r: sum(b[r] for b in per_pe) for r in REGIONS}
        return {"per_pe": per_pe, "by_region": totals,
                "total": sum(totals.values()), "max_pe": max(sum(b.values()) for b in per_pe)}

    def profile(self) -> dict:
        """Placement, bytes by region per PE and in total, modelled time, energy, traffic."""
        mem = self.memory()
        res, _ = self._call("counters", self._all)
        self._flush_steps()
        steps = max(self._steps, 1)
        step_us = self._step_time_sum / steps
        step_e = self._step_energy_sum / steps
        ends = max(self._ends, 1)
        end_us = self._end_time_sum / ends
        end_e = self._end_energy_sum / ends
        per_pe = []
        for p, info in enumerate(self.mapping.placement()):
            b = mem["per_pe"][p]
            per_pe.append({**info, "bytes_by_region": b, "bytes_total": sum(b.values()),
                           "cycles_total": res[p]["cycles"],
                           "packets_sent": res[p]["packets_sent"],
                           "packets_received": res[p]["packets_received"]})
        T_ref = 100  # a 1 s clip is 100 frames (shared/DESIGN.md)
        return {
            "pes": self.chip.n_pes,
            "clock_mhz": self.chip.clock_mhz,
            "precision": self.precision.name,
            "precision_detail": self.precision.to_dict(),
            "loss": self.loss,
            "optimizer": self.optimizer,
            "n_weights": self.cfg.n_weights,
            "pe_sram_bytes": PE_SRAM_BYTES,
            "memory_total_bytes": mem["total"],
            "memory_max_pe_bytes": mem["max_pe"],
            "memory_by_region": mem["by_region"],
            "memory_bytes_per_weight": mem["total"] / self.cfg.n_weights,
            "placement": per_pe,
            "routing_table": self.mapping.table_summary(),
            "steps_measured": self._steps,
            "step_time_us": step_us,
            "step_time_us_max": self._step_time_max,
            "realtime_margin": costs.STEP_BUDGET_US / self._step_time_max
            if self._step_time_max else None,
            "sample_end_time_us": end_us,
            "energy_per_step_uj": step_e,
            "energy_per_sample_uj": T_ref * step_e + end_e,
            "packets_per_step": self.router.packets_routed / steps,
            "deliveries_per_step": self.router.deliveries / steps,
            "packets_by_kind": dict(self.router.by_kind),
            "emulator_wall_s_per_step": self._wall_steps / steps,
        }

    def close(self) -> None:
        """Stop worker processes (multi-process mode); safe to call twice."""
        ex = getattr(self, "_exec", None)
        if ex is not None:
            ex.close()
            self._exec = None

    def __enter__(self) -> "EmulatedLearner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
