"""argparse types for the CLI: a wrong value becomes a usage error that names the option.

argparse turns an ArgumentTypeError into "edgeprop VERB: error: argument --X: ..." and
exit code 2, so every check here runs before any work starts and the user never sees
a traceback (or a silently wrapped port, or a NaN that ruins a model) for a typo.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

_TCP = re.compile(r"^tcp://(?P<host>\*|[A-Za-z0-9_.\-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>\*|\d+)$")


def endpoint(text: str) -> str:
    """A ZeroMQ endpoint: tcp://HOST:PORT (port 1-65535, or * for any free one),
    ipc://PATH or inproc://NAME. libzmq itself wraps ports above 65535 silently."""
    if text.startswith(("ipc://", "inproc://")):
        if text.split("://", 1)[1]:
            return text
        raise argparse.ArgumentTypeError(f"{text!r}: the endpoint names no path")
    m = _TCP.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a ZeroMQ endpoint (expected tcp://HOST:PORT, ipc://PATH or "
            "inproc://NAME, e.g. tcp://127.0.0.1:5555)")
    port = m.group("port")
    if port != "*" and not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: port {port} is not in 1-65535")
    return text


def connect_endpoint(text: str) -> str:
    """`endpoint` for an option that connects to one peer: a wildcard (*) only binds."""
    text = endpoint(text)
    if text.startswith("tcp://") and "*" in text:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a wildcard (*) can only bind; to connect, name the host and port "
            "the learner bound, e.g. tcp://127.0.0.1:5555")
    return text


def optional_endpoint(text: str) -> str:
    """`endpoint`, or "" for "off"."""
    return text if text == "" else endpoint(text)


def optional_connect_endpoint(text: str) -> str:
    """`connect_endpoint`, or "" for "off"."""
    return text if text == "" else connect_endpoint(text)


def _number(cast, text: str):
    try:
        value = cast(text)
    except ValueError:
        kind = "an integer" if cast is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
    if cast is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number")
    return value


def _at_least(cast, low: float, strict: bool):
    """A type: a number of kind `cast` that is > low (strict) or >= low."""
    def check(text: str):
        value = _number(cast, text)
        if not (value > low if strict else value >= low):
            raise argparse.ArgumentTypeError(f"{value}: must be {'>' if strict else '>='} {low:g}")
        return value

    return check


nonneg_int = _at_least(int, 0, strict=False)        # seeds, counts that may be zero
pos_int = _at_least(int, 1, strict=False)           # counts of at least one
nonneg_float = _at_least(float, 0.0, strict=False)  # finite, >= 0 (gains, seconds, coefs)
pos_float = _at_least(float, 0.0, strict=True)      # finite, > 0 (learning rates, timeouts)


def learning_rate(text: str) -> float:
    """An optimizer step size: finite, > 0 and at most 1. Above that Adam moves each
    weight by about the rate every step, so a typo (1e30) would train a model of
    noise that still gets written, or learn one online."""
    value = pos_float(text)
    if value > 1.0:
        raise argparse.ArgumentTypeError(f"{value:g}: a learning rate is at most 1 (the "
                                         "defaults are 1e-4 to 2e-3)")
    return value


def int_range(low: int, high: int):
    """A type: an integer in [low, high] (the bound named in the error)."""
    def check(text: str) -> int:
        value = _number(int, text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value}: must be in {low}-{high}")
        return value

    return check


def probability(text: str) -> float:
    """A number in [0, 1]."""
    value = _number(float, text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value}: must be in [0, 1]")
    return value


def below(high: float):
    """A type: a number in [0, high) (the bound named in the error)."""
    def check(text: str) -> float:
        value = _number(float, text)
        if not 0.0 <= value < high:
            raise argparse.ArgumentTypeError(f"{value}: must be in [0, {high:g})")
        return value

    return check


fraction = below(1.0)  # [0, 1): augmentation strengths, shares


def device(text: str) -> str:
    """An audio input device: its index or (part of) its name. An empty one would match
    every device's name; the default device is chosen by leaving --device out."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty: give a device index or name (see "
                                         "--list-devices), or leave --device out for the "
                                         "default input device")
    return text.strip()


def name_list(text: str) -> list[str]:
    """Comma-separated names (spaces around them dropped, repeats once): at least one, so
    a stray "," is not taken as "none given" and silently widened to everything."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names nothing; give NAME[,NAME...]")
    return names


def sample_rate(text: str) -> int:
    """A sample rate in Hz that audio hardware uses (edgeprop.audio.AUDIO_RATES)."""
    from edgeprop.audio import AUDIO_RATES

    rate = _number(int, text)
    if not AUDIO_RATES[0] <= rate <= AUDIO_RATES[1]:
        raise argparse.ArgumentTypeError(f"{text}: a sample rate in Hz, {AUDIO_RATES[0]}-"
                                         f"{AUDIO_RATES[1]} (e.g. 16000, 44100, 48000)")
    return rate


def _writable(folder: Path, text: str) -> None:
    from edgeprop.atomic_file import cannot_write_in

    why = cannot_write_in(folder)
    if why is not None:
        raise argparse.ArgumentTypeError(f"{text}: cannot make a file in {folder} (the OS says: "
                                         f"{why}); choose another place")


def stream_id(text: str) -> str:
    """--stream: printable, at most MAX_STREAM_CHARS (a learner rejects a longer hello);
    "" picks the command's own default."""
    from runtime.protocol import MAX_STREAM_CHARS

    if len(text) > MAX_STREAM_CHARS:
        raise argparse.ArgumentTypeError(f"{len(text)} characters: a stream id may have at "
                                         f"most {MAX_STREAM_CHARS}")
    if not text.isprintable():
        raise argparse.ArgumentTypeError(f"{text!r}: a stream id must be printable (no "
                                         "control characters or line breaks)")
    return text


def new_file(text: str) -> Path:
    """A file to write: its folder must exist and be writable, and it must not be a folder
    itself. Checked at the start, not when the file is first written (after the work, or
    at shutdown for a recording, when the work would be lost)."""
    path = Path(text)
    if not text or path.is_dir():
        raise argparse.ArgumentTypeError(f"{text or repr(text)} is a folder; give a file name")
    folder = path.absolute().parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: folder {path.parent} does not exist")
    _writable(folder, text)
    return path


def folder(text: str) -> Path:
    """A folder to read. Whether it exists is the command's to say (with its own hint);
    an empty name is refused here, since Path("") would silently be the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty: give a folder (an empty name would "
                                         "silently be the current one)")
    return Path(text)


def output_folder(text: str) -> Path:
    """A folder to write into (made when missing): it must not be a file, and it (or the
    nearest folder above it that exists) must be writable."""
    path = folder(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if existing.is_dir():
        _writable(existing, text)
    else:
        raise argparse.ArgumentTypeError(f"{text}: {existing} is a file, not a folder")
    return path
