"""Speech Commands (Warden 2018) in its own folder layout, for the 12-class task.

Layouts read (the dev folder and a full download alike)::

    <keyword>/<spk>_nohash_<n>.wav              the 10 keywords
    <other word>/<spk>_nohash_<n>.wav           full download: -> _unknown_
    _unknown_/<word>_<spk>_nohash_<n>.wav[.wav] Google's names for unknown words
    _silence_/<anything>.wav                    1 s background-only clips
    _background_noise_/*.wav                    long noise; cut into 1 s _silence_ clips
                                                only when there is no _silence_ folder
                                                (or when silence_per_noise_file is given)
    validation_list.txt, testing_list.txt       official split (split_from_lists)

A speaker is the 8-hex prefix before `_nohash_`. Silence clips have no speaker; each
gets a pseudo-speaker of its own (`silence:<name>` or `noise:<file>:<k>`), so speaker
splits spread them over both sides. Nothing is dropped silently: every file that is
not used appears in `ScanResult.skipped` with a reason, and a label with no clips is
reported there too.
"""

from __future__ import annotations

import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeprop.audio import load_wav
from edgeprop.errors import AudioError, DatasetError
from edgeprop.network import KWS_LABELS

SILENCE = "_silence_"
UNKNOWN = "_unknown_"
NOISE_DIR = "_background_noise_"
CLIP_SAMPLES = 16000
#: ../shared/data/speech_commands_dev beside the repository: where training, tests and
#: benchmarks find the dev set by default (it is never copied into the repo)
DEV_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "speech_commands_dev"


def _dev_data_candidates() -> tuple[Path, ...]:
    """$EDGEPROP_DATA alone when it is set (an explicit choice is never second-guessed),
    else DEV_DATA beside the repo, else /work/shared/... (an install outside the checkout)."""
    env = os.environ.get("EDGEPROP_DATA")
    if env:
        return (Path(env),)
    return DEV_DATA, Path("/work/shared/data/speech_commands_dev")


def default_data_dir() -> Path | None:
    """The dev set (see `_dev_data_candidates`), or None when it is not here. The one
    place every command, and the tests, find their default data."""
    return next((cand for cand in _dev_data_candidates() if cand.is_dir()), None)


def require_data_dir(arg: str | Path | None) -> Path:
    """`--data` if given, else the dev set; a DatasetError naming the folder when it is
    missing (for commands that cannot run without data)."""
    path = Path(arg) if arg else default_data_dir()
    if path is None:
        raise DatasetError(f"no Speech Commands folder at {_dev_data_candidates()[0]}; "
                           "pass --data DIR")
    if path.exists() and not path.is_dir():
        raise DatasetError(f"{path}: not a folder (expected a Speech Commands folder of "
                           "word folders); pass --data DIR")
    if not path.is_dir():
        raise DatasetError(f"{path}: no such folder (expected a Speech Commands folder); "
                           "pass --data DIR")
    return path


_NAME_RE = re.compile(
    r"^(?:(?P<word>.+?)_)?(?P<spk>[0-9a-fA-F]{8})_nohash_(?P<n>\d+)\.wav(?:\.wav)?$"
)


@dataclass(frozen=True)
class Clip:
    """One 1 s example. `offset`/`length` (samples) cut silence from a noise file."""

    path: Path
    label: str
    label_index: int
    speaker: str
    word: str
    offset: int = 0
    length: int = CLIP_SAMPLES

    @property
    def key(self) -> str:
        """Stable identity of the example (path plus cut), for caches and splits."""
        return f"{self.path}@{self.offset}+{self.length}"


@dataclass
class ScanResult:
    clips: list[Clip]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    labels: tuple[str, ...] = KWS_LABELS

    def counts_by_label(self) -> dict[str, int]:
        c = Counter(clip.label for clip in self.clips)
        return {lab: c.get(lab, 0) for lab in self.labels}

    def counts_by_speaker(self) -> dict[str, int]:
        c = Counter(clip.speaker for clip in self.clips if not _is_pseudo(clip.speaker))
        return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))

    def speakers(self) -> list[str]:
        return sorted(self.counts_by_speaker())


def _is_pseudo(speaker: str) -> bool:
    return speaker.startswith(("silence:", "noise:"))


def n_real_speakers(clips: list[Clip]) -> int:
    """Real speakers only (silence clips carry pseudo-speakers 'silence:...'/'noise:...')."""
    return len({c.speaker for c in clips if not _is_pseudo(c.speaker)})


def speaker_of(path: str | Path) -> str:
    """The 8-hex speaker id in a Speech Commands file name (lower case).

    Raises DatasetError when the name has none (silence clips have no speaker).
    """
    m = _NAME_RE.match(Path(path).name)
    if not m:
        raise DatasetError(f"{path}: no '<8 hex>_nohash_<n>.wav' speaker id in the name")
    return m.group("spk").lower()


def _wav_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


def _noise_len(path: Path) -> int:
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except (sf.SoundFileError, RuntimeError) as exc:
        raise AudioError(f"{path}: unreadable ({exc})") from None
    if info.samplerate != 16000:
        raise AudioError(f"{path}: {info.samplerate} Hz noise; expected 16000 Hz")
    return int(info.frames)


def scan_speech_commands(
    root: str | Path,
    labels: tuple[str, ...] = KWS_LABELS,
    *,
    silence_per_noise_file: int | None = None,
    seed: int = 0,
) -> ScanResult:
    """List the clips of a Speech Commands folder for the given label set.

    `labels` holds the keywords plus `_silence_` and `_unknown_` (in readout order).
    `silence_per_noise_file`: how many 1 s silence clips to cut from each
    `_background_noise_` file. None (default) = 0 when a `_silence_` folder has clips,
    else enough to give `_silence_` about as many clips as an average keyword.
    Cut positions are random but fixed by `seed`.
    """
    root = Path(root)
    if not root.is_dir():
        what = "a file, not a folder" if root.exists() else "no such folder"
        raise DatasetError(f"{root}: {what} (expected a Speech Commands folder)")
    index = {lab: i for i, lab in enumerate(labels)}
    keywords = [lab for lab in labels if lab not in (SILENCE, UNKNOWN)]
    clips: list[Clip] = []
    skipped: list[tuple[str, str]] = []
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    word_dirs = [d for d in subdirs if d.name not in (SILENCE, NOISE_DIR)]
    if not word_dirs and not (root / SILENCE).is_dir():
        raise DatasetError(f"{root}: no class folders (expected yes/, no/, ... as in Speech "
                           f"Commands)")

    for d in word_dirs:
        if d.name in index:
            label = d.name
        elif UNKNOWN in index:
            label = UNKNOWN
        else:
            for p in _wav_files(d):
                skipped.append((str(p), f"word {d.name!r} is not a label and there is no "
                                         f"{UNKNOWN} label"))
            continue
        for p in _wav_files(d):
            m = _NAME_RE.match(p.name)
            if not p.name.endswith(".wav"):
                skipped.append((str(p), "not a .wav file"))
                continue
            if not m:
                skipped.append((str(p), "name has no '<8 hex>_nohash_<n>' speaker id"))
                continue
            if d.name == UNKNOWN:
                word = m.group("word") or UNKNOWN
            else:
                word = d.name
            clips.append(Clip(p, label, index[label], m.group("spk").lower(), word))

    if SILENCE in index:
        sil_dir = root / SILENCE
        n_sil = 0
        if sil_dir.is_dir():
            for p in _wav_files(sil_dir):
                if not p.name.endswith(".wav"):
                    skipped.append((str(p), "not a .wav file"))
                    continue
                clips.append(Clip(p, SILENCE, index[SILENCE], f"silence:{p.name}", SILENCE))
                n_sil += 1
        noise_dir = root / NOISE_DIR
        per_file = silence_per_noise_file
        noise_files = ([p for p in _wav_files(noise_dir) if p.suffix == ".wav"]
                       if noise_dir.is_dir() else [])
        if per_file is None:
            if n_sil or not noise_files:
                per_file = 0
            else:
                n_kw = sum(1 for c in clips if c.label in keywords)
                per_file = max(1, -(-n_kw // max(1, len(keywords)) // len(noise_files)))
        if per_file:
            rng = np.random.default_rng(seed)
            for p in noise_files:
                try:
                    n = _noise_len(p)
                except AudioError as exc:
                    skipped.append((str(p), str(exc)))
                    continue
                if n < CLIP_SAMPLES:
                    skipped.append((str(p), f"noise shorter than 1 s ({n} samples)"))
                    continue
                offsets = np.sort(rng.integers(0, n - CLIP_SAMPLES + 1, size=per_file))
                for k, off in enumerate(offsets):
                    clips.append(Clip(p, SILENCE, index[SILENCE], f"noise:{p.name}:{k}",
                                      SILENCE, int(off), CLIP_SAMPLES))

    for p in sorted(q for q in root.iterdir() if q.is_file() and q.suffix == ".wav"):
        skipped.append((str(p), "wav file outside any class folder"))
    counts = Counter(c.label for c in clips)
    for lab in labels:
        if counts.get(lab, 0) == 0:
            skipped.append((str(root / lab), f"label {lab!r} has no clips"))
    if not clips:
        files = skipped_files(root, skipped, labels)
        why = (f"; all {len(files)} files were skipped, e.g. {files[0][0]}: {files[0][1]}"
               if files else "")
        raise DatasetError(f"{root}: no clips found for labels {list(labels)}{why}")
    return ScanResult(clips, skipped, tuple(labels))


def skipped_files(root: str | Path, skipped: list[tuple[str, str]],
                  labels: tuple[str, ...] = KWS_LABELS) -> list[tuple[str, str]]:
    """The skipped entries that are files (not the "label has no clips" notes): the
    ones a user would want to hear about, since they meant them to be clips."""
    empty = {str(Path(root) / lab) for lab in labels}
    return [(p, why) for p, why in skipped if p not in empty]


def skipped_note(files: list[tuple[str, str]]) -> str | None:
    """One line naming the first skipped file and why, with how many more: a file left
    out in silence looks like a clip that was used."""
    if not files:
        return None
    path, why = files[0]
    more = (f" (and {len(files) - 1} more; `edgeprop data info` lists them)"
            if len(files) > 1 else "")
    return f"note: skipped {path}: {why}{more}"


def _split_groups(groups: list[str], sizes: dict[str, int], fraction: float,
                  rng: np.random.Generator) -> set[str]:
    """Pick whole groups, in shuffled order, until they hold `fraction` of the clips."""
    order = [groups[i] for i in rng.permutation(len(groups))]
    target = fraction * sum(sizes[g] for g in groups)
    chosen: set[str] = set()
    total = 0
    for g in order:
        if total >= target:
            break
        chosen.add(g)
        total += sizes[g]
    return chosen


def speaker_split(clips: list[Clip], val_fraction: float = 0.2,
                  seed: int = 0) -> tuple[list[Clip], list[Clip]]:
    """(train, val) with no speaker on both sides; about `val_fraction` of the clips in val.

    Real speakers and silence pseudo-speakers are split separately, so each side gets
    its share of both. Deterministic for a seed.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be in (0, 1), got {val_fraction}")
    sizes = Counter(c.speaker for c in clips)
    rng = np.random.default_rng(seed)
    real = sorted(s for s in sizes if not _is_pseudo(s))
    pseudo = sorted(s for s in sizes if _is_pseudo(s))
    val_spk = _split_groups(real, sizes, val_fraction, rng) | _split_groups(
        pseudo, sizes, val_fraction, rng)
    train = [c for c in clips if c.speaker not in val_spk]
    val = [c for c in clips if c.speaker in val_spk]
    return train, val


def _list_key(clip: Clip, root: Path) -> str:
    """The `word/<spk>_nohash_<n>.wav` form used by validation_list.txt / testing_list.txt."""
    name = clip.path.name
    if name.endswith(".wav.wav"):
        name = name[:-4]
    if clip.path.parent.name == UNKNOWN:
        m = _NAME_RE.match(clip.path.name)
        if m and m.group("word"):
            return f"{m.group('word')}/{m.group('spk')}_nohash_{m.group('n')}.wav"
    return f"{clip.path.parent.name}/{name}"


def split_from_lists(root: str | Path, clips: list[Clip]) -> dict[str, list[Clip]]:
    """{'train', 'validation', 'testing'} from the dataset's own list files.

    A clip named in validation_list.txt / testing_list.txt goes there, the rest to
    train. Silence clips are not in the lists: they go 80/10/10 by a hash of their
    key (stable across runs). Raises DatasetError if neither list file exists (use
    `speaker_split` then).
    """
    root = Path(root)
    lists = {}
    for split, fname in (("validation", "validation_list.txt"), ("testing", "testing_list.txt")):
        p = root / fname
        if p.is_file():
            lists[split] = {line.strip() for line in p.read_text().splitlines() if line.strip()}
    if not lists:
        raise DatasetError(f"{root}: no validation_list.txt or testing_list.txt; "
                           f"use speaker_split instead")
    out: dict[str, list[Clip]] = {"train": [], "validation": [], "testing": []}
    for c in clips:
        if c.label == SILENCE:
            h = zlib.crc32(f"{c.path.name}@{c.offset}".encode()) % 10
            split = "validation" if h == 0 else "testing" if h == 1 else "train"
        else:
            key = _list_key(c, root)
            split = next((s for s, names in lists.items() if key in names), "train")
        out[split].append(c)
    return out


def load_clip(clip: Clip, sample_rate: int = 16000) -> np.ndarray:
    """Exactly 1 s (16000 samples) of float32 audio for one clip.

    Shorter clips are zero-padded at the end (as Google's own pipeline does); longer
    ones are cropped to their centre 1 s. Noise cuts read only their own segment.
    """
    n = int(round(sample_rate * clip.length / CLIP_SAMPLES))
    if clip.offset or clip.path.parent.name == NOISE_DIR:
        x = load_wav(clip.path, sample_rate, start=clip.offset, stop=clip.offset + clip.length)
    else:
        x = load_wav(clip.path, sample_rate)
    if x.shape[0] < n:
        x = np.concatenate([x, np.zeros(n - x.shape[0], dtype=np.float32)])
    elif x.shape[0] > n:
        start = (x.shape[0] - n) // 2
        x = x[start:start + n]
    return np.ascontiguousarray(x, dtype=np.float32)


def load_clips(clips: list[Clip], sample_rate: int = 16000) -> np.ndarray:
    """(N, 16000) float32 for a list of clips."""
    out = np.zeros((len(clips), sample_rate), dtype=np.float32)
    for i, c in enumerate(clips):
        out[i] = load_clip(c, sample_rate)
    return out


def labels_of(clips: list[Clip]) -> np.ndarray:
    return np.array([c.label_index for c in clips], dtype=np.int64)
