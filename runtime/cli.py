"""`edgeprop <verb>`: one tool, many verbs (git style).

Each verb lives in its own module under `runtime.commands` and exposes
`add_arguments(parser)` and `run(args) -> int`. Modules are imported only when their
verb runs, so `edgeprop --help` stays instant (librosa and numba load slowly).
User errors (`EdgepropError`, and an OSError about a path the user gave) become one
line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import shlex
import sys
import warnings

# verb -> (module, one-line help); a verb whose value is a dict is a group of sub-verbs.
VERBS: dict[str, object] = {
    "run": ("runtime.commands.run", "the main job: real clips streamed through the shipped model"),
    "bench": {
        "eprop": ("runtime.commands.bench_eprop", "online e-prop speed, memory, exactness"),
        "frontend": ("runtime.commands.bench_frontend", "feature frontend speed and exactness"),
        "sparse-bptt": ("runtime.commands.bench_sparse_bptt", "sparse vs dense BPTT (and torch)"),
        "detector": ("runtime.commands.bench_detector",
                     "streaming detection: keyword accuracy, false alarms, by hold"),
        "all": ("runtime.commands.bench_all", "every benchmark; writes docs/BENCHMARKS.md"),
    },
    "data": {
        "info": ("runtime.commands.data_info", "counts per class and speaker of a dataset folder"),
        "synth": ("runtime.commands.data_synth", "synthesise keywords with flite / festival"),
    },
    "pretrain": ("runtime.commands.pretrain", "train the keyword spotter with sparse BPTT"),
    "evaluate": ("runtime.commands.evaluate", "accuracy of a checkpoint on a dataset folder"),
    "profile": ("runtime.commands.profile", "SRNN on SpiNNaker 2 PEs: memory, time, energy"),
    "serve": ("runtime.commands.serve", "run a learner node (emulator or reference)"),
    "listen": ("runtime.commands.listen", "run a frontend node: microphone, file or stdin"),
    "record": ("runtime.commands.record", "record a stream of frames, labels and outputs"),
    "replay": ("runtime.commands.replay", "replay a recording through a checkpoint"),
    "regress": ("runtime.commands.regress", "replay the shipped recordings and compare to goldens"),
    "demo": {
        "live": ("runtime.commands.demo_live", "live microphone keyword spotting in the terminal"),
    },
    "personalize": ("runtime.commands.personalize", "adapt the model to one speaker with e-prop"),
}


def _overview() -> str:
    lines = ["usage: edgeprop <verb> [options]   (edgeprop <verb> --help for each)", "", "verbs:"]
    for verb, val in VERBS.items():
        if isinstance(val, dict):
            for sub, (_, text) in val.items():
                lines.append(f"  {verb + ' ' + sub:<20} {text}")
        else:
            lines.append(f"  {verb:<20} {val[1]}")
    return "\n".join(lines)


def _resolve(argv: list[str]) -> tuple[str, str, str, list[str]]:
    """Find (prog, module, help, rest) for argv, or exit with the overview."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_overview())
        raise SystemExit(0)
    if argv[0] == "--version":
        from edgeprop import __version__

        print(f"edgeprop {__version__}")
        raise SystemExit(0)
    verb, rest = argv[0], argv[1:]
    val = VERBS.get(verb)
    if val is None:
        print(f"edgeprop: unknown verb {verb!r}\n\n{_overview()}", file=sys.stderr)
        raise SystemExit(2)
    if isinstance(val, dict):
        if not rest or rest[0] in ("-h", "--help") or rest[0] not in val:
            subs = ", ".join(val)
            msg = f"usage: edgeprop {verb} {{{subs}}} [options]"
            asked = bool(rest) and rest[0] in ("-h", "--help")
            if rest and not asked:
                print(f"edgeprop {verb}: unknown sub-verb {rest[0]!r}\n{msg}", file=sys.stderr)
                raise SystemExit(2)
            out = sys.stdout if asked else sys.stderr  # no sub-verb: a usage error
            print(msg, file=out)
            for sub, (_, text) in val.items():
                print(f"  {sub:<14} {text}", file=out)
            raise SystemExit(0 if asked else 2)
        module, text = val[rest[0]]
        return f"edgeprop {verb} {rest[0]}", module, text, rest[1:]
    module, text = val
    return f"edgeprop {verb}", module, text, rest


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other user error (the whole
    usage block buried the message); --help still shows it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


@contextlib.contextmanager
def _one_line_warnings(prog: str):
    """A warning reaches the user as one line like every other message ("edgeprop VERB:
    warning: ..."), not as a source path, line number and code line."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"{prog}: warning: {message}", file=sys.stderr)

    old = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = old


def _path_error(exc: OSError) -> str:
    """One line for a path the user gave that cannot be used (missing folder, a folder
    where a file belongs, ...): the path and what is wrong with it."""
    what = exc.strerror or type(exc).__name__
    if exc.filename2 is not None:
        return f"{exc.filename} -> {exc.filename2}: {what}"
    return f"{exc.filename}: {what}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog, module_name, text, rest = _resolve(argv)
    from edgeprop.errors import EdgepropError

    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            print(f"{prog}: not available in this build", file=sys.stderr)
            return 2
        raise
    parser = _Parser(prog=prog, description=text)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    # the command as typed, for the records a run writes (a report, a training record):
    # from argv, so that main([...]) called from Python names its own arguments
    args.command_line = shlex.join(["edgeprop", *argv])
    try:
        with _one_line_warnings(prog):
            return int(module.run(args) or 0)
    except EdgepropError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.filename is None:  # not about a path the user gave: a bug, show it
            raise
        print(f"{prog}: error: {_path_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
