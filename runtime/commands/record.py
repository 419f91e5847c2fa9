"""`edgeprop record OUT`: listen (mic, file, folder or stdin) and record the stream.

The recording holds every frame sent (with its labels), and every posterior and
detection received, after a header naming the frontend config, encoder and the model's
params_hash (runtime/recording.py). `edgeprop replay OUT` replays it deterministically.
`edgeprop record --list-devices` lists the inputs (no OUT then).
"""

from __future__ import annotations

import argparse

from edgeprop.errors import ConfigError
from runtime.arg_types import new_file
from runtime.commands import listen


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=new_file, nargs="?", default=None,
                        help="recording file to write (atomic: OUT.part until done; a failed "
                             "record leaves OUT as it was); not with --list-devices")
    listen.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.out is None and not args.list_devices:
        raise ConfigError("record needs OUT, the recording file to write, e.g. "
                          "edgeprop record session.rec --file clip.wav")
    return listen.run(args, recorder_path=args.out)
