"""`edgeprop personalize`: adapt the keyword spotter to one speaker with online e-prop.

Non-interactive (evaluation), on a Speech Commands folder::

    edgeprop personalize --data DIR --speaker HASH --shots 2 [--json] [--report OUT.md]
    edgeprop personalize --data DIR --all-speakers --min-clips 30 --shots 2 --json

Interactive (default when --data is absent and stdin is a terminal): prompts for each
keyword, records and trims each utterance from the microphone, adapts on the emulator,
reports accuracy before/after on held-back utterances and saves a personalised
checkpoint. The base checkpoint is never written; see docs/personalization.md.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import replace
from pathlib import Path

from runtime.arg_types import (
    device,
    folder,
    fraction,
    learning_rate,
    name_list,
    new_file,
    nonneg_int,
    output_folder,
    pos_float,
    pos_int,
    probability,
)
from runtime.commands.listen import add_mic_rate_argument, refuse_mic_options
from runtime.console import add_output_flags, print_json, say

MIN_CLIPS = 30  # --all-speakers: the sweep's default bar
SMALL_TEST = 10  # fewer test clips than this and the after/before figures are mostly chance
# the interactive session's options and their defaults (refused with --data when changed)
LIVE_DEFAULTS = {"takes": 4, "holdout": 1, "keywords": None, "name": "me", "timeout": 8.0}


def speaker_hash(text: str) -> str:
    """A speaker hash as the folder spells it (file names are <hash>_nohash_<n>.wav):
    spaces dropped, lower case, never empty."""
    text = text.strip().lower()
    if not text:
        raise argparse.ArgumentTypeError("empty: give a speaker hash, e.g. 97f4c236 "
                                         "(edgeprop data info DIR lists them)")
    return text


def speaker_list(text: str) -> list[str]:
    """--speakers A,B: hashes as speaker_hash spells them, each once (a repeat would count
    twice in the means), at least one (checked in run, a ConfigError like before)."""
    from edgeprop.errors import ConfigError

    try:
        return name_list(text.lower())
    except argparse.ArgumentTypeError:
        raise ConfigError(f"--speakers {text!r} names no speaker; give comma-separated "
                          "hashes, e.g. --speakers 837a0f64,97f4c236") from None


def report_file(text: str) -> Path:
    """--report: a markdown file to write (new_file). The plot is written beside it as
    <stem>.png, so a .png name would have the report overwrite its own plot."""
    path = new_file(text)
    if path.suffix.lower() == ".png":
        raise argparse.ArgumentTypeError(f"{text}: give the markdown file (e.g. "
                                         f"{path.with_suffix('.md')}); the plot is written "
                                         f"beside it as {path.name}")
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from edgeprop.optim import OPTIMIZER_KINDS
    from firmware_model.precision import VARIANTS
    from runtime.personalization import AdaptConfig

    d = AdaptConfig()
    parser.add_argument("--model", type=Path, default=None,
                        help="base checkpoint (default: the shipped model); never modified")
    parser.add_argument("--data", type=folder, default=None,
                        help="Speech Commands folder: run the non-interactive protocol")
    who = parser.add_mutually_exclusive_group()
    who.add_argument("--speaker", type=speaker_hash, default=None,
                     help="speaker hash (8 hex digits)")
    who.add_argument("--all-speakers", action="store_true",
                     help="sweep every speaker with >= --min-clips clips")
    who.add_argument("--speakers", default=None,
                     help="comma-separated speaker hashes to sweep")
    parser.add_argument("--min-clips", type=pos_int, default=None,
                        help=f"--all-speakers: the clips a speaker needs (default {MIN_CLIPS})")
    parser.add_argument("--shots", type=pos_int, default=d.shots,
                        help="adaptation utterances per keyword (default %(default)s)")
    parser.add_argument("--backend", choices=["emulator", "reference"], default="emulator",
                        help="where e-prop runs (default: the SpiNNaker 2 emulator)")
    parser.add_argument("--seed", type=nonneg_int, default=d.seed)
    parser.add_argument("--lr", type=learning_rate, default=d.lr,
                        help="learning rate (default %(default)s)")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZER_KINDS), default=d.optimizer,
                        help="adam, plain sgd, or sgd with momentum (default %(default)s)")
    parser.add_argument("--passes", type=nonneg_int, default=d.passes,
                        help="passes over the shots (default %(default)s)")
    parser.add_argument("--update", choices=["pass", "utterance"], default=d.update,
                        help="optimizer step once per pass on the gradients accumulated over "
                             "it, or after every utterance (default %(default)s)")
    parser.add_argument("--learn", default=",".join(d.learn),
                        help="layers that learn, of w_in,w_rec,w_out (default %(default)s)")
    parser.add_argument("--augment", type=nonneg_int, default=d.augment,
                        help="noisy copies of the shots (background noise, shift, gain), "
                             "replayed in turn on passes after the first (default "
                             "%(default)s)")
    parser.add_argument("--rehearsal", type=nonneg_int, default=d.rehearsal,
                        help="generic clips of other speakers per pass (default %(default)s)")
    parser.add_argument("--silence", type=nonneg_int, default=d.silence,
                        help="_silence_ clips per pass (default %(default)s)")
    parser.add_argument("--pull", type=fraction, default=d.pull,
                        help="pull toward the base weights after each update, in [0, 1)")
    parser.add_argument("--validate", action="store_true",
                        help="keep the adaptation only if it lowers the loss on held-back "
                             "shots (2-fold over the shots; never the test set)")
    parser.add_argument("--skip-above", type=probability, default=d.skip_above,
                        help="keep the base when it already gets at least this fraction of "
                             "the speaker's shots right (default %(default)s; 0 = never)")
    parser.add_argument("--guard", action=argparse.BooleanOptionalAction, default=d.guard,
                        help="undo any update that lowers accuracy on the adaptation data "
                             "(shots + rehearsal clips; never the test set)")
    parser.add_argument("--user-norm", type=probability, default=None, metavar="FRACTION",
                        help="before e-prop, move the frontend's normalisation this fraction "
                             "of the way to the speaker's speech mean, measured on the shots "
                             f"(default {d.user_norm}, or 0 for a checkpoint whose frontend "
                             "already moved in an earlier session; 0 = keep the frontend)")
    parser.add_argument("--precision", default=None, choices=list(VARIANTS),
                        help=f"emulator storage format (default {d.precision}, the chip's "
                             "default; fp32 is bit-exact with --backend reference)")
    parser.add_argument("--no-unknown", action="store_true",
                        help="do not use the speaker's _unknown_ clips as shots")
    # a bare --out gives False, the default path: a string const would go through new_file
    parser.add_argument("--out", nargs="?", type=new_file, const=False, default=None,
                        metavar="CKPT",
                        help="save the personalised checkpoint (default: "
                             "<base>.<speaker>.npz beside the base; for the shipped "
                             "model, in <user data dir>/personal/)")
    parser.add_argument("--report", type=report_file, default=None,
                        help="write a markdown report with a PNG plot of accuracy against "
                             "adaptation utterances")
    parser.add_argument("--cache-dir", type=output_folder, default=None,
                        help="feature cache folder")
    live = parser.add_argument_group("interactive session")
    live.add_argument("--interactive", action="store_true",
                      help="force the microphone session (even without a terminal)")
    live.add_argument("--device", type=device, default=None,
                      help="input device (index or name)")
    add_mic_rate_argument(live)
    live.add_argument("--takes", type=pos_int, default=LIVE_DEFAULTS["takes"],
                      help="utterances recorded per keyword (default %(default)s)")
    live.add_argument("--holdout", type=nonneg_int, default=LIVE_DEFAULTS["holdout"],
                      help="of those, held back to test (default %(default)s)")
    live.add_argument("--keywords", default=LIVE_DEFAULTS["keywords"],
                      help="comma-separated keywords to record (default: all 10)")
    live.add_argument("--name", default=LIVE_DEFAULTS["name"],
                      help="speaker name for the saved checkpoint")
    live.add_argument("--timeout", type=pos_float, default=LIVE_DEFAULTS["timeout"],
                      help="seconds to wait for each utterance (default %(default)s)")
    add_output_flags(parser)


def adapt_config(args, ckpt):
    """The protocol's settings from the options; --user-norm unset follows the checkpoint
    (personalization.resolve_user_norm), and says so when it keeps a moved frontend."""
    from runtime.personalization import AdaptConfig, resolve_user_norm

    user_norm, note = resolve_user_norm(ckpt, args.user_norm)
    if note:
        say(note)
    learn = tuple(s.strip() for s in args.learn.split(",") if s.strip())
    return AdaptConfig(shots=args.shots, passes=args.passes, lr=args.lr,
                       optimizer=args.optimizer, learn=learn, update=args.update,
                       pull=args.pull, augment=args.augment, rehearsal=args.rehearsal,
                       silence=args.silence,
                       include_unknown=not args.no_unknown, validate=args.validate,
                       guard=args.guard, skip_above=args.skip_above,
                       user_norm=user_norm, precision=args.precision or AdaptConfig().precision,
                       seed=args.seed)


def _warm_up(args, ckpt, acfg) -> float:
    """The learner's kernels loaded before any adaptation is timed (reported apart)."""
    from runtime.personalization import warm_up_learner

    if not args.quiet:
        say(f"loading the {args.backend}'s e-prop kernels (the first run after an install "
            "compiles them, about a minute) ...")
    return warm_up_learner(args.backend, ckpt, acfg)


def _noisy_takes(takes: list, room: list, acfg, to_input):
    """`acfg.augment` noisy copies of the takes, the room's own noise mixed in (Augmenter)."""
    import numpy as np

    from edgeprop.augment import Augmenter

    if not acfg.augment or not takes:
        return None
    aug = Augmenter([np.concatenate(room)] if room else [])
    rng = np.random.default_rng([acfg.seed, 1000])
    return np.stack([np.stack([to_input(aug(u, rng)) for u in takes])
                     for _ in range(acfg.augment)])


def load_base(model: Path | None):
    """(checkpoint, path) of the base model: --model or the shipped one."""
    from edgeprop.checkpoint import load_checkpoint
    from edgeprop.shipped import SHIPPED_MODEL, load_shipped

    if model is None:
        return load_shipped(), SHIPPED_MODEL
    return load_checkpoint(model), Path(model)


def run(args) -> int:
    from edgeprop.errors import ConfigError
    from edgeprop.shipped import SHIPPED_MODEL
    from runtime.personalization import refuse_base_as_out

    if args.out:  # before any work, not after the session
        refuse_base_as_out(args.out, Path(args.model) if args.model else SHIPPED_MODEL)
    if args.data is not None:
        if args.interactive:
            raise ConfigError("--interactive records from the microphone and --data runs the "
                              "protocol on a folder: give one of them")
        refuse_mic_options(args, f"--data {args.data} (the non-interactive protocol)")
        _refuse_live_options(args)
    if args.precision not in (None, "fp32") and args.backend == "reference":
        raise ConfigError(f"--precision {args.precision} is the emulator's storage format; "
                          "--backend reference learns in fp32: drop --precision, or use "
                          "--backend emulator")
    if args.data is None:
        if args.speaker or args.all_speakers or args.speakers:
            raise ConfigError("--speaker/--all-speakers need --data DIR (a Speech Commands "
                              "folder)")
        if not (args.interactive or sys.stdin.isatty()):
            raise ConfigError("no --data DIR and no terminal: pass --data DIR for the "
                              "non-interactive protocol, or --interactive for the microphone")
        return run_interactive(args)
    return _run_dataset(args)


def _refuse_live_options(args) -> None:
    """The interactive session's options do nothing with --data: say so, not ignore them."""
    from edgeprop.errors import ConfigError

    given = [f"--{k}" for k, v in LIVE_DEFAULTS.items() if getattr(args, k) != v]
    if given:
        raise ConfigError(f"{', '.join(given)} set{'s' if len(given) == 1 else ''} up the "
                          f"microphone session, but --data {args.data} runs the protocol on "
                          f"the folder: drop {', '.join(given)} (--shots sets the utterances "
                          "per keyword)")


def _refuse_sweep_options(args) -> None:
    """Options that one mode would silently ignore, refused before any work."""
    from edgeprop.errors import ConfigError

    if args.speaker is None and not args.speakers and not args.all_speakers:
        raise ConfigError("say whose voice: --speaker HASH, --speakers A,B or --all-speakers")
    if args.min_clips is not None and not args.all_speakers:
        raise ConfigError("--min-clips chooses the speakers of --all-speakers; with "
                          "--speaker/--speakers the speakers are named: drop --min-clips")
    if args.out is not None and args.speaker is None:
        raise ConfigError("--out saves one speaker's checkpoint; use it with --speaker")


def _shortfall(split, shots: int, words: list[str]) -> str | None:
    """What the speaker lacks for `shots` of every keyword, or None: "no 'up', 1 of 'go'"."""
    from collections import Counter

    have = Counter(c.label for c in split.shots)
    short = [f"no {w!r}" if not have[w] else f"{have[w]} of {w!r}"
             for w in words if have[w] < shots]
    return ", ".join(short) or None


def _run_dataset(args) -> int:
    from edgeprop.errors import DatasetError, EdgepropError
    from edgeprop.network import KWS_LABELS
    from runtime import personalization as P
    from runtime.console import progress

    named = speaker_list(args.speakers) if args.speakers is not None else None
    _refuse_sweep_options(args)
    ckpt, base_path = load_base(args.model)
    acfg = adapt_config(args, ckpt)
    cache = None
    if args.cache_dir is not None:
        from edgeprop.feature_cache import FeatureCache

        cache = FeatureCache(args.cache_dir)
    session = P.Session.open(ckpt, args.data, cache)
    if session.absent_labels():
        say(f"note: {args.data} holds no clips of {', '.join(session.absent_labels())}; "
            "they are neither adapted nor tested")
    min_clips = MIN_CLIPS if args.min_clips is None else args.min_clips
    if args.speaker is not None:
        speakers = [args.speaker]
    elif named:
        speakers = named
    else:
        speakers = session.speakers(min_clips)
        if not speakers:
            raise DatasetError(f"{session.data_dir}: no speaker has >= {min_clips} clips "
                               "(--min-clips)")
    splits = P.check_speakers(session, speakers, acfg)  # before any work, every speaker
    if acfg.user_norm:
        session.reference_speech_mean()  # a model without one fails here, not after warm-up
    common = {"model": str(base_path), "data": str(args.data), "backend": args.backend,
              "adapt_config": acfg.to_dict(), "warmup_seconds": _warm_up(args, ckpt, acfg)}
    t0 = time.perf_counter()
    if args.speaker is None:
        done: list[dict] = []
        with progress("speakers", len(speakers), args.quiet) as adv:
            def on_speaker(r: dict) -> None:
                done.append(r)
                adv()
                say(f"{r['speaker']}: {100 * r['before']:.1f} % -> {100 * r['after']:.1f} % "
                    f"(adapt {r['n_adapt']}, test {r['n_test']})")

            try:
                out = P.sweep(session, acfg, min_clips=min_clips, backend=args.backend,
                              speakers=speakers, curve=args.report is not None,
                              on_speaker=on_speaker)
            except KeyboardInterrupt:  # the finished speakers' results are not lost
                _interrupted_sweep(args, common, done, len(speakers))
                raise
        result = common | {"min_clips": min_clips} | out
        n = out["n_speakers"]
        say(f"{n} speaker{'s' if n != 1 else ''}: mean {100 * out['mean_before']:.2f} % -> "
            f"{100 * out['mean_after']:.2f} %, relative error reduction "
            f"{100 * out['relative_error_reduction']:.1f} %, worst delta "
            f"{100 * out['worst_delta']:+.1f} points, "
            f"{1000 * out['seconds_per_adapt_utterance']:.0f} ms per adaptation utterance "
            f"({args.backend})")
        for part, what in (("heldout", "held out from pretraining"),
                           ("seen", "seen in pretraining")):
            h = out.get(part) or {}
            if h.get("n_speakers"):
                n = h["n_speakers"]
                say(f"  {what} ({n} speaker{'s' if n != 1 else ''}): "
                    f"{100 * h['mean_before']:.2f} % -> {100 * h['mean_after']:.2f} %, "
                    f"relative error reduction {100 * h['relative_error_reduction']:.1f} %")
        few = [r["speaker"] for r in out["speakers"] if r["n_test"] < SMALL_TEST]
        if few:  # their before/after move in steps over 10 points: chance weighs in the means
            say(f"note: {len(few)} speaker{'s' if len(few) != 1 else ''} ({', '.join(few)}) "
                f"had fewer than {SMALL_TEST} clips left to test on; a higher --min-clips "
                "or fewer --shots gives steadier figures")
    else:
        r = P.personalize_speaker(session, args.speaker, acfg, backend=args.backend,
                                  curve=args.report is not None)
        params, frontend = r.pop("_params"), r.pop("_frontend")
        words = [lab for lab in (ckpt.labels or KWS_LABELS) if not lab.startswith("_")]
        short = _shortfall(splits[args.speaker], args.shots, words)
        if short:
            say(f"{r['speaker']} has {short} here: adapting on {r['n_adapt']} shots, not "
                f"{args.shots} of each keyword")
        if r["n_test"] < SMALL_TEST:
            n = r["n_test"]
            say(f"warning: only {n} of {r['speaker']}'s clips {'is' if n == 1 else 'are'} "
                f"left to test on, so one clip moves the accuracy by {100 / n:.0f} points; "
                "use fewer --shots, or a speaker with more clips")
        if r["skipped"]:
            say(f"the base model already got {100 * r['shot_accuracy_before']:.0f} % of the "
                f"shots right (--skip-above {acfg.skip_above:g}): it is kept as it is")
        say(f"{r['speaker']}: accuracy {100 * r['before']:.1f} % -> {100 * r['after']:.1f} % "
            f"on {r['n_test']} held-out clips, adapted on {r['n_adapt']} "
            f"({r['n_learned']} learned utterances, {r['adapt_seconds']:.2f} s, {args.backend})")
        result = common | r
        if args.out is not None:
            path = P.save_personalized(ckpt, base_path, params, r["speaker"], acfg,
                                       out=Path(args.out) if args.out else None,
                                       result={k: r[k] for k in ("before", "after", "n_adapt",
                                                                 "n_test")},
                                       frontend=frontend)
            result["out"] = str(path)
            say(f"wrote {path} (base {base_path} untouched)")
    result["seconds"] = time.perf_counter() - t0
    result["command"] = args.command_line
    if args.report is not None:
        try:
            png = write_report(result, args.report)
        except OSError as exc:  # the results are not lost with the report: print them
            if args.json:
                print_json(result)
            where = "on stdout (--json)" if args.json else "above"
            raise EdgepropError(f"--report {args.report}: cannot write "
                                f"{exc.filename or args.report}: {exc.strerror or exc}; "
                                f"the results are {where}") from None
        result["report"] = str(args.report)
        result["plot"] = str(png)
        say(f"wrote {args.report} and {png}")
    if args.json:
        print_json(result)
    return 0



# ---------------------------------------------------------------- interactive session
TRIES = 3  # prompts per take before the session gives up on the microphone


def _record_utterances(source, endpointer, want: int, timeout_s: float, prompt,
                       tries: int = TRIES) -> tuple[list, float]:
    """Read the microphone until `want` utterances were heard. A take not heard within
    `timeout_s` is prompted again, up to `tries` times, so one slow answer does not end
    a session (and lose its takes). Returns (utterances, loudest 10 ms level in dBFS
    while waiting for the last one): too few utterances and a low level mean a muted
    or quiet microphone, which the caller says."""
    from runtime.personalization import frame_db

    got: list = []
    missed, loudest = 0, -120.0
    prompt(len(got), missed)
    deadline = time.monotonic() + timeout_s
    for block in source.blocks():
        levels = frame_db(block.samples)
        loudest = max(loudest, float(levels.max())) if levels.size else loudest
        dropped = endpointer.too_long
        utts = endpointer.push(block.samples)
        if endpointer.too_long > dropped:  # not a take: say why, and wait for the word
            say("   (that went on for more than 2 s without a pause: say just the word)")
            deadline = time.monotonic() + timeout_s
        for utt in utts:
            got.append(utt)
            if len(got) >= want:
                return got, loudest
            missed, loudest = 0, -120.0
            prompt(len(got), missed)
            deadline = time.monotonic() + timeout_s
        if time.monotonic() > deadline and not endpointer.in_utterance:
            missed += 1
            if missed >= tries:
                break
            prompt(len(got), missed)
            deadline = time.monotonic() + timeout_s
    return got, loudest


def run_interactive(args) -> int:
    """Prompt, record, trim, adapt on the emulator, compare before/after, save."""
    import numpy as np

    from edgeprop.errors import ConfigError, DeviceError
    from edgeprop.evaluation import checkpoint_frontend, encode_batch
    from edgeprop.frontend import features
    from runtime import personalization as P
    from runtime.sources import MicrophoneSource

    if args.takes < 1 or not 0 <= args.holdout < args.takes:
        raise ConfigError(f"--holdout {args.holdout} leaves no take of --takes {args.takes} "
                          "to adapt on: need 0 <= --holdout < --takes")
    ckpt, base_path = load_base(args.model)
    labels = list(ckpt.labels)
    words = [lab for lab in labels if not lab.startswith("_")]
    keywords = (list(dict.fromkeys(k.strip() for k in args.keywords.split(",") if k.strip()))
                if args.keywords is not None else words)  # each once: a repeat lost takes
    unknown = [k for k in keywords if k not in words]
    if unknown or not keywords:
        said = f"not keywords of this model: {unknown}" if unknown else \
            f"--keywords {args.keywords!r} names no keyword"
        raise ConfigError(f"{said}; choose from {words}")
    # the takes kept for adaptation are this session's shots (its saved settings say so)
    acfg = replace(adapt_config(args, ckpt), shots=args.takes - args.holdout)
    fcfg = checkpoint_frontend(ckpt)
    # checked before anyone speaks, not after
    reference = P.training_speech_mean(ckpt) if acfg.user_norm else None

    def features_of(audio: np.ndarray, chain=fcfg) -> np.ndarray:
        return features(P.fit_clip(audio)[None], chain)[0]

    def to_input(audio: np.ndarray, chain=fcfg) -> np.ndarray:
        return encode_batch(ckpt, features_of(audio, chain)[None])[0]

    # before the microphone opens (it captures from then on) and before anyone speaks
    warmup_seconds = _warm_up(args, ckpt, acfg)
    source = MicrophoneSource(device=args.device, capture_rate=args.mic_rate)
    recorded: dict[str, list[np.ndarray]] = {}
    silence: list[np.ndarray] = []
    try:
        say("personalization: stay quiet for 1 s while the noise level is measured ...")
        ep = P.Endpointer()
        quiet: list[np.ndarray] = []
        for block in source.blocks():
            quiet.append(block.samples)
            ep.push(block.samples)
            if len(quiet) >= 100:
                break
        silence.append(np.concatenate(quiet))
        say(f"noise floor {ep.floor_db:.1f} dBFS")
        for word in keywords:
            def prompt(k: int, missed: int, word: str = word) -> None:
                again = (f"   (nothing heard in {args.timeout:g} s; try {missed + 1} of "
                         f"{TRIES})" if missed else "")
                say(f'say "{word}"  ({k + 1}/{args.takes}){again}')

            utts, loudest = _record_utterances(source, ep, args.takes, args.timeout, prompt)
            if len(utts) < args.takes:
                need = ep.word_level_db
                raise DeviceError(
                    f'heard only {len(utts)} of {args.takes} takes of "{word}" ({TRIES} '
                    f"prompts of {args.timeout:g} s for the next one); the loudest sound "
                    f"then was {loudest:.0f} dBFS and a word must reach {need:.0f} dBFS "
                    f"(noise floor {ep.floor_db:.0f} dBFS): "
                    + _why_no_take(loudest, ep)
                    + "; devices: edgeprop demo live --list-devices")
            recorded[word] = utts
    finally:
        source.close()
    overruns = int(getattr(source, "overruns", 0) or 0)

    # shots = the first takes, held back = the last --holdout takes of every keyword
    idx = {lab: i for i, lab in enumerate(labels)}
    shot_audio, shot_y, test_audio, test_y = [], [], [], []
    for word, utts in recorded.items():
        for k, u in enumerate(utts):
            held = k >= args.takes - args.holdout
            (test_audio if held else shot_audio).append(u)
            (test_y if held else shot_y).append(idx[word])
    t0 = time.perf_counter()
    user = fcfg  # the user's frontend (P.user_frontend), from the shots alone
    if acfg.user_norm:
        user = P.user_frontend(fcfg, np.stack([features_of(u) for u in shot_audio]),
                               reference, acfg.user_norm)
    x_shot = np.stack([to_input(u, user) for u in shot_audio])
    t_frontend = time.perf_counter() - t0
    y_shot = np.array(shot_y)
    sil_idx = idx.get("_silence_")
    gen_x, gen_y = _rehearsal_inputs(ckpt, acfg, to_input)  # other voices: base chain
    if sil_idx is not None:
        for s in silence:  # the user's room, heard through the user's chain from now on
            gen_x.append(to_input(s, user))
            gen_y.append(sil_idx)
    x_gen = np.stack(gen_x) if gen_x else np.zeros((0,) + x_shot.shape[1:], np.float32)
    y_gen = np.array(gen_y, np.int64)
    say(f"adapting on {len(y_shot)} utterances ({args.backend}) ...")
    run, info = P.adapt_validated(ckpt, x_shot, y_shot, x_gen, y_gen, acfg,
                                  backend=args.backend,
                                  noisy=lambda: _noisy_takes(shot_audio, silence, acfg,
                                                             lambda a: to_input(a, user)))
    run.seconds += t_frontend
    if info.get("skipped"):
        user = fcfg  # the base is kept whole, its frontend too
        say(f"the base model already recognised at least {acfg.skip_above:.0%} of the takes: "
            "it is kept as it is (--skip-above 0 adapts anyway)")
    result = {"speaker": args.name, "keywords": keywords, "n_adapt": int(len(y_shot)),
              "n_learned": run.n_utterances, "skipped": bool(info.get("skipped")),
              "adapt_seconds": run.seconds,
              "seconds_per_adapt_utterance": run.seconds / max(len(y_shot), 1),
              "backend": args.backend, "model": str(base_path), "mic_overrun_samples": overruns,
              "warmup_seconds": warmup_seconds,
              "adapt_config": acfg.to_dict()}
    result["frontend_moved"] = user != fcfg
    if test_y:
        y_test = np.array(test_y)
        result["before"] = P.accuracy_of(ckpt, ckpt.params,
                                         np.stack([to_input(u) for u in test_audio]), y_test)
        result["after"] = P.accuracy_of(ckpt, run.params,
                                        np.stack([to_input(u, user) for u in test_audio]),
                                        y_test)
        result["n_test"] = int(len(y_test))
        say(f"held-back utterances: accuracy {100 * result['before']:.0f} % before, "
            f"{100 * result['after']:.0f} % after ({len(y_test)} utterances)")
    else:
        say("no takes were held back (--holdout 0), so there is no accuracy before and "
            "after to show; --holdout 1 or more measures it")
    out = Path(args.out) if args.out else None
    earlier = P.default_personal_path(base_path, args.name)
    earlier = earlier if out is None and earlier.exists() else None
    path = P.save_personalized(ckpt, base_path, run.params, args.name, acfg, out=out,
                               result={k: result[k] for k in ("before", "after", "n_adapt",
                                                              "n_test") if k in result},
                               frontend=user)
    result["out"] = str(path)
    say(f"saved the personalised model to {path} (base {base_path} untouched); use it with "
        f"`edgeprop demo live --model {path}`"
        + (f"; the earlier one is kept at {earlier}" if earlier is not None else ""))
    if args.json:
        print_json(result)
    return 0


def _why_no_take(loudest: float, ep) -> str:
    """What to do when no take was heard: the advice depends on what set the bar."""
    if loudest <= -119.0:
        return "the microphone gave only digital silence (muted, or the wrong device?)"
    if loudest >= ep.word_level_db:
        return "sounds were heard, but none was a word (100 ms to 2 s, then a pause)"
    if ep.noise_sets_the_bar:
        return (f"the room is too noisy (a word must stand {ep.start_db:g} dB above its "
                "noise): find a quieter place, or speak closer to the microphone")
    return "raise the microphone's gain, or speak closer"


def _rehearsal_inputs(ckpt, acfg, to_input) -> tuple[list, list]:
    """Generic clips of other voices to rehearse: the clips shipped with the runtime."""
    import numpy as np

    from edgeprop.audio import load_wav
    from runtime.stream import embedded_clips

    labels = list(ckpt.labels)
    try:
        clips = embedded_clips()
    except Exception:  # noqa: BLE001 - rehearsal is an improvement, not a requirement
        return [], []
    rng = np.random.default_rng([acfg.seed, 5])
    order = rng.permutation(len(clips))[: max(acfg.rehearsal * max(acfg.passes, 1), 0)]
    xs, ys = [], []
    for i in sorted(order):
        c = clips[i]
        if c.label in labels:
            xs.append(to_input(load_wav(c.path, 16000)))
            ys.append(labels.index(c.label))
    return xs, ys


# ---------------------------------------------------------------- report
def _interrupted_sweep(args, common: dict, done: list[dict], planned: int) -> None:
    """Ctrl-C in a sweep: say (and with --json print) the speakers finished so far."""
    from runtime.personalization import summarize

    if not done:
        return
    part = summarize(done)
    say(f"interrupted after {len(done)} of {planned} speakers: mean "
        f"{100 * part['mean_before']:.2f} % -> {100 * part['mean_after']:.2f} % over those "
        "(not the sweep's figure; run it again for the whole)")
    if args.json:
        print_json(common | {"interrupted": True, "n_planned": planned, "speakers": done}
                   | part)


def write_report(result: dict, md_path: Path) -> Path:
    """Markdown report + PNG plot (accuracy against adaptation utterances), atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgeprop.atomic_file import atomic_write_text

    md_path = Path(md_path)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    png = md_path.with_suffix(".png")
    curve = result.get("curve") or []
    per = result.get("speakers") or []
    fig, ax = plt.subplots(figsize=(6, 4))
    if curve:
        ax.plot([p["n_adapt"] for p in curve], [100 * p["accuracy"] for p in curve], "o-",
                label="mean over speakers" if per else result.get("speaker", ""))
    first = True
    for r in per:
        c = r.get("curve") or []
        if c:  # labelled once: a reader must know what the grey lines are
            ax.plot([p["n_adapt"] for p in c], [100 * p["accuracy"] for p in c], "-",
                    color="0.8", lw=0.8, zorder=0, label="each speaker" if first else None)
            first = False
    who = f"{len(per)} speakers" if per else f"speaker {result.get('speaker', '')}"
    shots = (result.get("adapt_config") or {}).get("shots")
    ax.set_xlabel("adaptation utterances (per speaker)"
                  + (f"; up to {shots} per keyword" if shots else ""))
    ax.set_ylabel("accuracy on the speaker's other clips (%)")
    ax.set_title(f"personalization ({result.get('backend')}), {who}, "
                 f"{Path(result['data']).name}")
    ax.grid(alpha=0.3)
    if curve:
        ax.legend()
    fig.tight_layout()
    tmp = png.with_name("." + png.name + ".tmp.png")
    try:
        fig.savefig(tmp, dpi=110)
        tmp.replace(png)
    except OSError as exc:  # name the user's file, not the hidden temporary one
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OSError(exc.errno, exc.strerror, str(png)) from None
    finally:
        plt.close(fig)

    pct = lambda v: "-" if v is None else f"{100 * v:.1f} %"
    ms = lambda v: "- (every base was kept)" if v is None else f"{1000 * v:.1f} ms"
    learned = result.get("seconds_per_learned_utterance")
    lines = ["# Personalization report", "", f"Command: `{result.get('command', '')}`", "",
             f"Model: `{result['model']}`; data: `{result['data']}`; backend: "
             f"{result['backend']}.", "", f"Adaptation settings: `{result['adapt_config']}`", ""]
    if per:
        lines += ["| | value |", "|---|---|",
                  f"| speakers | {result['n_speakers']} |",
                  f"| mean accuracy before | {pct(result['mean_before'])} |",
                  f"| mean accuracy after | {pct(result['mean_after'])} |",
                  f"| relative error reduction | {pct(result['relative_error_reduction'])} |",
                  f"| worst speaker delta | {100 * result['worst_delta']:+.1f} points |",
                  f"| speakers > 2 points worse | {result['n_worse_by_more_than_2_points']} |",
                  f"| wall time per adaptation utterance | "
                  f"{1000 * result['seconds_per_adapt_utterance']:.0f} ms |",
                  f"| wall time per learned utterance | {ms(learned)} |", ""]
        for key, title in (("heldout", "held out from pretraining"),
                           ("seen", "seen in pretraining")):
            h = result.get(key)
            if h and h.get("n_speakers"):
                lines += [f"Speakers {title}: {h['n_speakers']}, {pct(h['mean_before'])} -> "
                          f"{pct(h['mean_after'])}, relative error reduction "
                          f"{pct(h['relative_error_reduction'])}, worst delta "
                          f"{100 * h['worst_delta']:+.1f} points.", ""]
        lines += ["| speaker | seen in pretraining | before | after | n_adapt | n_test |",
                  "|---|---|---|---|---|---|"]
        for r in per:
            lines.append(f"| {r['speaker']} | {r['seen_in_pretraining']} | {pct(r['before'])} "
                         f"| {pct(r['after'])} | {r['n_adapt']} | {r['n_test']} |")
        lines.append("")
    else:
        seen = result.get("seen_in_pretraining")
        lines += [f"Speaker {result['speaker']}: {pct(result['before'])} -> "
                  f"{pct(result['after'])} on {result['n_test']} held-out clips, adapted on "
                  f"{result['n_adapt']} ({result.get('n_learned', '?')} learned utterances, "
                  f"{result['adapt_seconds']:.2f} s).", "",
                  "Seen in pretraining: " + ("unknown (the checkpoint does not record its "
                                             "split)" if seen is None else str(seen))
                  + f"; base kept by the skip rule: {bool(result.get('skipped'))}; "
                  f"frontend moved toward the speaker: {bool(result.get('frontend_moved'))}.",
                  ""]
        if result.get("out"):
            lines += [f"Personalised checkpoint: `{result['out']}`.", ""]
    if curve:
        lines += ["Accuracy against adaptation utterances (the plot's points"
                  + (", mean over speakers" if per else "") + "):", "",
                  "| shots per keyword | adaptation utterances | accuracy |", "|---|---|---|"]
        lines += [f"| {p['shots']} | {p['n_adapt']:g} | {pct(p['accuracy'])} |"
                  for p in curve]
        lines.append("")
    lines += [f"![accuracy against adaptation utterances]({png.name})", ""]
    try:
        atomic_write_text(md_path, "\n".join(lines))
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(md_path)) from None
    return png
