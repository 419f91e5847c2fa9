"""Synthetic keywords from flite and festival voices, written in the Speech Commands layout.

Each voice is a pseudo-speaker with a stable 8-hex id (sha256 of the voice name), so
the loader and speaker splits treat it like a person. Takes vary speaking rate (and,
for flite, pitch) so one voice gives several different clips::

    OUT/<word>/<spk>_nohash_<take>.wav      16 kHz mono PCM16, exactly 1 s, word centred
    OUT/synth_manifest.json                 what made each file (voice, word, settings)

Keywords land in their own folder; other words too (the loader maps them to
`_unknown_`, as for a full download). A file whose manifest entry matches is not
made again (the cache). This module shells out to the `flite` / `text2wave` binaries
(Debian packages flite, festival, festvox-kallpc16k); it is optional tooling, the
tests skip when they are absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from edgeprop.atomic_file import atomic_write_text
from edgeprop.audio import load_wav
from edgeprop.errors import DatasetError

KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
DEFAULT_VOICES = ("flite:kal16", "flite:awb", "flite:rms", "flite:slt", "festival:kal_diphone")
#: (duration stretch, pitch mean Hz or None = the voice's own), one per take.
TAKES = ((1.0, None), (0.85, None), (1.15, None), (1.0, 90.0), (1.0, 170.0))
SYNTH_VERSION = 1


@dataclass(frozen=True)
class Voice:
    engine: str  # "flite" | "festival"
    name: str

    @property
    def key(self) -> str:
        return f"{self.engine}:{self.name}"

    @property
    def speaker(self) -> str:
        return hashlib.sha256(self.key.encode()).hexdigest()[:8]


def parse_voice(text: str) -> Voice:
    engine, sep, name = text.partition(":")
    if not sep:
        engine, name = "flite", text
    if engine not in ("flite", "festival") or not name:
        raise DatasetError(f"voice {text!r}: write flite:<voice> or festival:<voice>")
    return Voice(engine, name)


def available_voices() -> dict[str, str]:
    """{voice key: ''} for voices that can speak here, or {key: reason} for those that can't."""
    out: dict[str, str] = {}
    if shutil.which("flite"):
        res = subprocess.run(["flite", "-lv"], capture_output=True, text=True, timeout=30)
        for name in res.stdout.split(":", 1)[-1].split():
            out[f"flite:{name}"] = ""
    if shutil.which("text2wave"):
        for base in (Path("/usr/share/festival/voices"), Path("/usr/lib/festival/voices")):
            if base.is_dir():
                for d in base.glob("*/*"):
                    if d.is_dir():
                        out[f"festival:{d.name}"] = ""
    return out


def missing_reason(voice: Voice, available: dict[str, str]) -> str | None:
    if voice.key in available:
        return None
    binary = "flite" if voice.engine == "flite" else "text2wave"
    if not shutil.which(binary):
        pkg = "flite" if voice.engine == "flite" else "festival"
        return f"{binary} not installed (apt-get install {pkg})"
    have = sorted(k for k in available if k.startswith(voice.engine + ":"))
    return f"voice {voice.key} not installed; available: {', '.join(have) or 'none'}"


def _speak(voice: Voice, word: str, stretch: float, pitch: float | None, out: Path) -> None:
    if voice.engine == "flite":
        cmd = ["flite", "-voice", voice.name, "--setf", f"duration_stretch={stretch}"]
        if pitch is not None:
            cmd += ["--setf", f"int_f0_target_mean={pitch}"]
        cmd += ["-t", word, "-o", str(out)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    else:
        evals = f"(begin (voice_{voice.name}) (Parameter.set 'Duration_Stretch {stretch}))"
        res = subprocess.run(["text2wave", "-o", str(out), "-eval", evals],
                             input=word, capture_output=True, text=True, timeout=60)
    if res.returncode != 0 or not out.is_file() or out.stat().st_size == 0:
        raise DatasetError(f"{voice.key} failed on {word!r}: {res.stderr.strip()[:200]}")


def fit_one_second(x: np.ndarray, n: int = 16000, peak: float = 0.5) -> np.ndarray:
    """Trim near-silence (< 1 % of peak) at both ends, centre in n samples, peak-normalise."""
    m = float(np.abs(x).max()) if x.size else 0.0
    if m == 0:
        return np.zeros(n, dtype=np.float32)
    loud = np.flatnonzero(np.abs(x) > 0.01 * m)
    x = x[loud[0]:loud[-1] + 1]
    if x.shape[0] > n:
        start = (x.shape[0] - n) // 2
        x = x[start:start + n]
    out = np.zeros(n, dtype=np.float32)
    start = (n - x.shape[0]) // 2
    out[start:start + x.shape[0]] = x * (peak / m)
    return out


#: what --words may hold: each word becomes a folder name under the output
WORD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9'-]*")


@dataclass(frozen=True)
class SynthPlan:
    """A checked request: what `make_clips` will speak, and the voices left out (why)."""

    out_dir: Path
    words: tuple[str, ...]
    voices: tuple[Voice, ...]
    missing: dict
    takes: int

    @property
    def clips(self) -> int:
        return len(self.voices) * len(self.words) * self.takes


def plan_synthesis(out_dir: str | Path, words=KEYWORDS, voices=DEFAULT_VOICES,
                   takes: int = len(TAKES)) -> SynthPlan:
    """Every check before any work (so a bad word or no voice is said before a progress
    bar starts). Unavailable voices are left out with the reason; if none is available
    a DatasetError says what to install."""
    out_dir = Path(out_dir)
    if not 1 <= takes <= len(TAKES):
        raise DatasetError(f"takes must be 1..{len(TAKES)}, got {takes}")
    bad = [w for w in words if not WORD_RE.fullmatch(w)]
    if bad:
        raise DatasetError(f"not a word: {', '.join(map(repr, bad))} (a word is letters, "
                           "digits, - and ' only: it names a class folder under the output)")
    upper = [w for w in words if w != w.lower()]
    if upper:  # Yes/ is not the class yes/: its clips would count as _unknown_
        raise DatasetError(f"{', '.join(map(repr, upper))}: words name class folders, which "
                           f"are lowercase; give {', '.join(w.lower() for w in upper)}")
    words = tuple(dict.fromkeys(words))  # a word said twice would be counted twice
    if out_dir.exists() and not out_dir.is_dir():
        raise DatasetError(f"{out_dir} is a file; the output must be a folder")
    parsed = list({v.key: v for v in map(parse_voice, voices)}.values())  # each once
    _refuse_foreign_clips(out_dir, {v.speaker for v in parsed})
    avail = available_voices()
    missing = {v.key: r for v in parsed if (r := missing_reason(v, avail))}
    usable = tuple(v for v in parsed if v.key not in missing)
    if not usable:
        raise DatasetError("no TTS voice available: " + "; ".join(missing.values()))
    return SynthPlan(out_dir, tuple(words), usable, missing, takes)


MANIFEST = "synth_manifest.json"


def _read_manifest(out_dir: Path) -> dict:
    """What made each file under `out_dir` ({} for none, or a damaged manifest)."""
    path = out_dir / MANIFEST
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _refuse_foreign_clips(out_dir: Path, speakers: set[str]) -> None:
    """Synthetic voices belong in a folder of their own (pretrain --synth puts them in
    training only): written into a real dataset they would also land in its speaker
    split's validation side. A folder with clips this module did not make (not in its
    manifest, nor of these voices' pseudo-speakers: a run cut short) is refused."""
    if not out_dir.is_dir():
        return
    ours = _read_manifest(out_dir)
    foreign = [p for p in sorted(out_dir.glob("*/*.wav"))
               if f"{p.parent.name}/{p.name}" not in ours
               and p.name.split("_nohash_")[0] not in speakers]
    if foreign:
        raise DatasetError(f"{out_dir} holds {len(foreign)} clips edgeprop data synth did not "
                           f"make (e.g. {foreign[0].relative_to(out_dir)}; a real dataset?): "
                           "write synthetic voices to a folder of their own and give it to "
                           "pretrain --synth, which trains on them only")


def synthesize(out_dir: str | Path, words=KEYWORDS, voices=DEFAULT_VOICES,
               takes: int = len(TAKES), progress=None) -> dict:
    """Make (or reuse) one clip per word x voice x take; return a summary dict."""
    return make_clips(plan_synthesis(out_dir, words, voices, takes), progress)


def make_clips(plan: SynthPlan, progress=None) -> dict:
    """Speak a checked plan; files made earlier with the same settings are reused.
    `progress(1)` after each clip."""
    out_dir, words, usable, missing, takes = (plan.out_dir, plan.words, plan.voices,
                                              plan.missing, plan.takes)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / MANIFEST
    manifest = _read_manifest(out_dir)
    made = reused = 0
    for voice in usable:
        for word in words:
            for take in range(takes):
                stretch, pitch = TAKES[take]
                if voice.engine == "festival" and pitch is not None:
                    stretch, pitch = 1.0 + 0.07 * take, None  # festival: rate only
                rel = f"{word}/{voice.speaker}_nohash_{take}.wav"
                spec = {"voice": voice.key, "word": word, "stretch": stretch, "pitch": pitch,
                        "version": SYNTH_VERSION}
                target = out_dir / rel
                if manifest.get(rel) == spec and target.is_file():
                    reused += 1
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with tempfile.TemporaryDirectory() as tmp:
                        raw = Path(tmp) / "raw.wav"
                        _speak(voice, word, stretch, pitch, raw)
                        x = fit_one_second(load_wav(raw, 16000))
                        part = Path(tmp) / "clip.wav"
                        sf.write(part, x, 16000, subtype="PCM_16")
                        shutil.move(str(part), str(target.with_suffix(".part")))
                    os.replace(target.with_suffix(".part"), target)
                    manifest[rel] = spec
                    made += 1
                if progress:
                    progress(1)
        atomic_write_text(manifest_path, json.dumps(manifest, indent=1, sort_keys=True))
    return {"out": str(out_dir), "made": made, "reused": reused,
            "clips": made + reused, "voices": [v.key for v in usable],
            "speakers": {v.key: v.speaker for v in usable}, "missing_voices": missing,
            "words": list(words), "takes": takes}
