"""Coverage-guided fuzzing of the wire decoder with atheris (libFuzzer for Python).

Optional and not part of the test run (the file name does not start with ``test_``).
It complements tests/test_fuzz_protocol.py: hypothesis explores structured inputs,
atheris mutates bytes guided by which branches of protocol.py they reach.

    pip install atheris
    python tests/fuzz_atheris_protocol.py -atheris_runs=200000      # or -max_total_time=60

The property is the same as in the hypothesis tests: `decode` (and `peek`, what the
broker routes on) returns or raises WireError; an accepted message re-encodes to a
stable canonical form. Any other exception is a finding: libFuzzer stops and writes the
input to crash-<sha1> in the current folder.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from runtime import protocol as P


def seeds() -> list[bytes]:
    import numpy as np

    bits = np.zeros((2, 1, 80), dtype=np.uint8)
    bits[0, 0, ::3] = 1
    return [P.encode(m) for m in (
        P.Hello("s", "h", "e", 80),
        P.Frames("s", 1, 0.01, 0.01, "e", bits, [0, -1], [1, -1], [5, 6]),
        P.Frames("s", 1, 0.01, 0.01, "e", bits.astype(np.float32)),
        P.Posteriors("s", 1, 0.0, np.zeros((1, 12), np.float32)),
        P.ControlRequest("teach", "s", {"label": 0}),
        P.EndOfStream("s", 3),
    )]


def one_input(data: bytes) -> None:
    try:  # the broker's routing decoder: (type, stream) or WireError
        P.peek(data)
    except P.WireError:
        pass
    try:
        msg = P.decode(data)
    except P.WireError:
        return
    again = P.encode(msg)
    if P.encode(P.decode(again)) != again:
        raise AssertionError("accepted message is not stable under re-encoding")


def main() -> None:
    # libFuzzer takes a corpus folder; give it the valid messages as a starting point
    import os
    import tempfile

    corpus = tempfile.mkdtemp(prefix="edgeprop_fuzz_corpus_")
    for i, s in enumerate(seeds()):
        with open(os.path.join(corpus, f"seed{i}"), "wb") as f:
            f.write(s)
    atheris.Setup(sys.argv + [corpus], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
