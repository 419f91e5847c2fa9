"""PE groups as executors: in this process, or in worker processes over ZeroMQ.

The host side of the emulator (router, host link) talks to groups of PEs only by
`call(cmd, args_by_pe, deliveries)`: deliver the packets routed to the group's PEs,
then run one firmware command on some of them. `LocalGroups` does that with direct
calls; `ProcessGroups` starts one worker process per group (quad-PEs by default) and
exchanges the same messages over ZeroMQ REQ/REP sockets on ipc:// endpoints. A worker
builds its own PEProgram objects from the config and gets only its PEs' rows of the
weights, so equal results in both modes show that PEs share no hidden state.

Messages are Python objects (numpy arrays inside) pickled by pyzmq's send_pyobj; the
sockets are private to this host and its own children.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid

import numpy as np

from edgeprop.errors import EdgepropError
from edgeprop.network import ModelConfig
from firmware_model import costs
from firmware_model.kernels import sample_batch_kernel, tick_batch_kernel
from firmware_model.precision import get_precision
from firmware_model.program import PEProgram
from firmware_model.router import INPUT, SPIKE

_WORKER_MAIN = "import sys; from firmware_model.multiproc import serve; serve(sys.argv[1])"

Deliveries = dict[int, list[tuple]]  # pe -> [(keys, payloads, kind, index)]


class WorkerError(EdgepropError):
    """A PE-group worker process failed or stopped answering."""


def build_programs(spec: dict, pe_ids: list[int]) -> dict[int, PEProgram]:
    """PEPrograms for `pe_ids` from a picklable spec (config, slices, options)."""
    cfg = ModelConfig.from_dict(spec["cfg"])
    prec = get_precision(spec["precision"])
    return {
        p: PEProgram(p, cfg, tuple(spec["slices"][p]), p == spec["readout_pe"], prec,
                     spec["loss"], spec["optimizer"], spec["lr"], spec["reg_coef"],
                     spec["target_rate"], spec.get("seed", 0))
        for p in pe_ids
    }


def run_group(programs: dict[int, PEProgram], deliveries: Deliveries, cmd: str,
              args_by_pe: dict[int, dict]) -> dict[int, tuple[object, int]]:
    """Deliver packets to this group's PEs, then run `cmd` on the PEs in args_by_pe."""
    for p, batches in deliveries.items():
        prog = programs[p]
        for batch in batches:
            prog.receive(*batch)
    return {p: programs[p].handle(cmd, args) for p, args in args_by_pe.items()}


class LocalGroups:
    """All PEs in this process (the fast path).

    A tick whose deliveries are the same multicast batches (input frame, spikes) for
    every PE runs all PEs' tick kernels in one numba call (`tick_batch_kernel`): each PE
    still fills its own buffers from the packets and touches only its own arrays; only
    the Python dispatch is shared. Anything else goes through `run_group`.
    """

    def __init__(self, spec: dict, groups: list[list[int]]) -> None:
        self.groups = groups
        self.programs = build_programs(spec, [p for g in groups for p in g])
        self._order = sorted(self.programs)
        self._lists = None
        self._accs = None
        self._accs_sig = None
        self._counts = np.zeros((len(self._order), 3), np.int64)
        self._take = np.zeros((len(self._order), 2), np.bool_)

    def call(self, cmd: str, args_by_pe: dict[int, dict], deliveries: Deliveries) -> dict:
        if cmd == "tick" and len(args_by_pe) == len(self._order):
            fast = self._tick_fast(deliveries)
            if fast is not None:
                return fast
        elif cmd in ("finish_sample", "apply", "load_opt_state"):
            self._accs = None  # these may swap a PE's accumulator buffer
        return run_group(self.programs, deliveries, cmd, args_by_pe)

    def _pe_arrays(self):
        """Tuples of each PE's tick arrays, one per argument of the batched kernels (built
        once; the accumulators' on a swap). Tuples, not numba typed Lists: a typed List
        costs about 3 s of method compiling in every new process."""
        if self._lists is None or self._accs is None:
            arrays = [self.programs[p].tick_arrays() for p in self._order]
            if self._lists is None:
                self._lists = [tuple(a[k] for a in arrays) for k in range(11)]
            sig = tuple(id(a[8]) for a in arrays)
            if sig != self._accs_sig:
                self._lists[8] = tuple(a[8] for a in arrays)
                self._accs_sig = sig
            self._accs = self._lists[8]
        return self._lists

    def _tick_fast(self, deliveries: Deliveries):
        """The batched tick, if every delivery is one shared input and/or spike batch."""
        inp = spk = None
        take = self._take
        take[:] = False
        for i, p in enumerate(self._order):
            for batch in deliveries.get(p, ()):
                kind = batch[2]
                if kind == INPUT and (inp is None or inp is batch):
                    inp = batch
                    take[i, 0] = True
                elif kind == SPIKE and (spk is None or spk is batch):
                    spk = batch
                    take[i, 1] = True
                else:
                    return None
        empty_f, empty_i = np.zeros(0, np.float32), np.zeros(0, np.uint32)
        x, x_idx = (inp[1].view(np.float32), inp[3]) if inp is not None else (empty_f, empty_i)
        s_idx = spk[3] if spk is not None else empty_i
        n_x = 0 if inp is None else int(inp[0].size)
        n_s = 0 if spk is None else int(spk[0].size)
        p0 = self.programs[self._order[0]]
        L = self._pe_arrays()
        tick_batch_kernel(x, x_idx, s_idx, take, L[0], L[1], L[2], L[3], L[4], L[5], L[6],
                          L[7], L[8], p0._consts, L[9], L[10], p0.mode, p0.alif,
                          p0.prec.fused, p0.acc.half, self._counts)
        out = {}
        recv = costs.CYCLES["packet_recv"]
        for i, p in enumerate(self._order):
            prog = self.programs[p]
            n_rx = n_x * int(take[i, 0]) + n_s * int(take[i, 1])
            prog.pe.counters.cycles += recv * n_rx
            prog.pe.counters.packets_received += n_rx
            c = self._counts[i]
            keys = prog.tick_done(int(c[0]), int(c[1]), int(c[2]))
            out[p] = ((keys, None), prog.take_cycles())
        return out

    def run_sample(self, xs: np.ndarray, x_to: np.ndarray, spikes_to: np.ndarray,
                   readout_pe: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All ticks and readout steps of one mean-loss sample in one numba call.

        The same kernels, packets and cycles as stepping tick by tick, for a mapping
        whose input frame goes to the PEs in `x_to` and every spike to `spikes_to`
        (multicast sets, one bool per PE). The PEs' counters are charged as the packets
        would have charged them; the cycles of the last step's spikes stay unreported,
        as when they arrive with the end of the sample. Returns the phases' cycles per
        step and PE, (T, n_pes) for the tick and the readout, and spikes per step (T,).
        """
        order = self._order
        assert order == list(range(len(order))), "PE ids are 0..n-1"
        T, n_in = xs.shape
        P = len(order)
        take = self._take
        take[:, 0] = x_to
        take[:, 1] = spikes_to
        counts = np.zeros((T, P, 3), np.int64)
        ro_counts = np.zeros(T, np.int64)
        progs = [self.programs[p] for p in order]
        ro = progs[readout_pe]
        r0s = np.array([pr.r0 for pr in progs], np.int64)
        spike_idx = np.zeros(ro.n_rec, np.uint32)
        p0 = progs[0]
        L = self._pe_arrays()
        sample_batch_kernel(xs, np.arange(n_in, dtype=np.uint32), take, r0s, L[0], L[1], L[2],
                            L[3], L[4], L[5], L[6], L[7], L[8], p0._consts, L[9], L[10], p0.mode,
                            p0.alif, p0.prec.fused, p0.acc.half, counts, spike_idx, ro._zin_ro,
                            ro._w_out_c, ro.y, ro.sum_y, ro.zbar, ro.sum_zbar, ro._spk, ro_counts)
        spikes = counts[:, :, 0].sum(axis=1)
        before = np.concatenate([[0], spikes[:-1]])  # spikes of step t-1, received at tick t
        recv = costs.CYCLES["packet_recv"]
        send = costs.CYCLES["packet_send"]
        c_tick = np.zeros((T, P), np.int64)
        c_ro = np.zeros((T, P), np.int64)
        for p, prog in enumerate(progs):
            c = counts[:, p]
            # spikes for the readout PE arrive in its readout phase; for the others they
            # are charged before their next tick (or with the end of the sample)
            late = spikes_to[p] and p != readout_pe
            c_tick[:, p] = (prog.tick_cycles(c[:, 0], c[:, 1], c[:, 2])
                            + recv * n_in * int(x_to[p]) + recv * before * int(late))
            pending = recv * int(spikes[-1]) * int(late)
            cnt = prog.pe.counters
            carry = cnt.cycles - prog._mark  # charged before, reported with the first tick
            c_tick[0, p] += carry
            cnt.packets_received += n_in * T * int(x_to[p]) + int(spikes.sum()) * int(spikes_to[p])
            cnt.packets_sent += int(c[:, 0].sum())
            if p == readout_pe:
                n_out = prog.n_out
                c_ro[:, p] = (recv * spikes * int(spikes_to[p]) + send * n_out
                              + prog.readout_cycles(ro_counts))
                cnt.packets_sent += n_out * T
                cnt.payload_bytes_sent += 4 * n_out * T
                prog.stats[0] += float(T)
            cnt.cycles += int(c_tick[:, p].sum() + c_ro[:, p].sum()) - carry
            prog._mark = cnt.cycles
            cnt.cycles += pending
        return c_tick, c_ro, spikes

    def close(self) -> None:
        pass


class ProcessGroups:
    """One worker process per group; REQ/REP over ipc:// (lockstep = the tick barrier)."""

    def __init__(self, spec: dict, groups: list[list[int]], timeout_s: float = 60.0) -> None:
        import zmq

        self.groups = groups
        self.group_of = {p: gi for gi, g in enumerate(groups) for p in g}
        self.timeout_ms = int(timeout_s * 1000)
        self.ctx = zmq.Context()
        self._dir = tempfile.mkdtemp(prefix="edgeprop-pe-")
        self.socks, self.procs, self.endpoints = [], [], []
        try:
            for gi in range(len(groups)):
                ep = f"ipc://{self._dir}/g{gi}-{uuid.uuid4().hex[:8]}"
                sock = self.ctx.socket(zmq.REQ)
                sock.setsockopt(zmq.LINGER, 0)
                sock.bind(ep)
                proc = subprocess.Popen([sys.executable, "-c", _WORKER_MAIN, ep],
                                        stdin=subprocess.DEVNULL)
                self.socks.append(sock)
                self.procs.append(proc)
                self.endpoints.append(ep)
            for gi, g in enumerate(groups):
                self._send(gi, {"cmd": "init", "spec": spec, "pe_ids": g})
            for gi in range(len(groups)):
                self._recv(gi)
        except BaseException:
            self.close()
            raise

    def _send(self, gi: int, msg: dict) -> None:
        self.socks[gi].send_pyobj(msg)

    def _recv(self, gi: int):
        import zmq

        if not self.socks[gi].poll(self.timeout_ms, zmq.POLLIN):
            raise WorkerError(f"PE group {gi} (PEs {self.groups[gi]}) did not answer")
        reply = self.socks[gi].recv_pyobj()
        if isinstance(reply, dict) and "error" in reply:
            raise WorkerError(f"PE group {gi} failed: {reply['error']}")
        return reply

    def call(self, cmd: str, args_by_pe: dict[int, dict], deliveries: Deliveries) -> dict:
        involved = sorted({self.group_of[p] for p in list(args_by_pe) + list(deliveries)})
        for gi in involved:
            g = set(self.groups[gi])
            self._send(gi, {"cmd": cmd,
                            "args": {p: a for p, a in args_by_pe.items() if p in g},
                            "deliveries": {p: d for p, d in deliveries.items() if p in g}})
        out: dict = {}
        for gi in involved:
            out.update(self._recv(gi))
        return out

    def close(self) -> None:
        for _gi, sock in enumerate(self.socks):
            try:
                sock.send_pyobj({"cmd": "stop"})
                sock.poll(2000)
            except Exception:  # noqa: BLE001 - best effort on shutdown
                pass
            sock.close(0)
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.socks, self.procs = [], []
        self.ctx.term()
        for name in os.listdir(self._dir) if os.path.isdir(self._dir) else []:
            try:
                os.unlink(os.path.join(self._dir, name))
            except OSError:
                pass
        try:
            os.rmdir(self._dir)
        except OSError:
            pass


def serve(endpoint: str) -> None:
    """Worker main loop: build the group's PEs, then run commands until 'stop'."""
    import zmq

    ctx = zmq.Context()
    rep = ctx.socket(zmq.REP)
    rep.connect(endpoint)
    programs: dict[int, PEProgram] = {}
    try:
        while True:
            msg = rep.recv_pyobj()
            cmd = msg["cmd"]
            if cmd == "stop":
                rep.send_pyobj({})
                break
            try:
                if cmd == "init":
                    programs = build_programs(msg["spec"], msg["pe_ids"])
                    rep.send_pyobj({})
                else:
                    rep.send_pyobj(run_group(programs, msg["deliveries"], cmd, msg["args"]))
            except Exception as exc:  # noqa: BLE001 - reported to the host, which raises
                rep.send_pyobj({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        rep.close(0)
        ctx.term()


if __name__ == "__main__":
    serve(sys.argv[1])
