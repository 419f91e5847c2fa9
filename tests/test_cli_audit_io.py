"""User mistakes with `edgeprop listen` / `record` and the `bench` verbs: each is one line
"edgeprop VERB: error: ..." and exit code 2 (no traceback, no hang, no option silently
ignored), and a benchmark reports what it promises. Real subprocesses, sockets, files."""

from __future__ import annotations

import io
import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from runtime_support import start_learner

from edgeprop.errors import AudioError
from edgeprop.shipped import load_shipped
from runtime.sources import FolderSource, StdinSource

REPO = Path(__file__).resolve().parents[1]
CLIP = REPO / "runtime" / "assets" / "clips" / "left_42beb5eb_nohash_0.flac"


def _cli(*argv, stdin=None, data: bytes | None = None, timeout: float = 60):
    return subprocess.run([sys.executable, "-m", "runtime.cli", *map(str, argv)], cwd=REPO,
                          capture_output=True, timeout=timeout, stdin=stdin, input=data)


def _user_error(out: subprocess.CompletedProcess, verb: str) -> str:
    """The one stderr line of a user mistake: exit 2, no traceback."""
    err = out.stderr.decode()
    assert out.returncode == 2, err[-2000:]
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines()
             if not ln.startswith(("listen: stream", "record: stream"))]
    assert len(lines) == 1 and lines[0].startswith(f"edgeprop {verb}: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def learner():
    node = start_learner(load_shipped())
    try:
        yield node.endpoints["data_router"]
    finally:
        node.stop()
        node.core.close()


@pytest.mark.parametrize("value", ["0.01", "2000"])
def test_block_ms_is_bounded(value):
    """0.01 ms is 0 samples a block (ZeroDivisionError); over 1 s the mic never fills one."""
    err = _user_error(_cli("listen", "--file", CLIP, "--block-ms", value), "listen")
    assert "--block-ms" in err and "0.0625-1000 ms" in err


@pytest.mark.parametrize("argv, says", [
    (["--folder", "{clips}", "--label", "yes"], "--label labels the clip of --file, but "
                                                "--folder labels each clip by its class"),
    (["--label", "yes"], "but the microphone is not a labelled clip"),
    (["--stdin", "--realtime"], "--realtime paces a --file or --folder replay, but --stdin"),
    (["--realtime"], "but the microphone is read as it arrives"),
    (["--file", "{clip}", "--stdin-dtype", "float32"], "--stdin-dtype is the sample format "
                                                       "of --stdin"),
])
@pytest.mark.parametrize("verb", ["listen", "record"])
def test_options_the_source_would_ignore_are_refused(verb, argv, says, tmp_path):
    argv = [a.format(clips=CLIP.parent, clip=CLIP) for a in argv]
    pre = [tmp_path / "x.rec"] if verb == "record" else []
    err = _user_error(_cli(verb, *pre, *argv, stdin=subprocess.DEVNULL), verb)
    assert says in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("value, says", [("x" * 129, "129 characters: a stream id may "
                                                    "have at most 128"),
                                         ("a\nb", "a stream id must be printable")])
def test_stream_id_is_bounded_and_printable(value, says):
    err = _user_error(_cli("listen", "--file", CLIP, "--stream", value), "listen")
    assert "--stream" in err and says in err


@pytest.mark.parametrize("verb, argv, ignored", [
    ("listen", ["--list-devices", "--file", "{clip}", "--realtime"], "--file and --realtime"),
    ("record", ["{out}", "--list-devices"], "so OUT would be ignored"),
    ("demo", ["live", "--list-devices", "--replay", "{clip}"], "so --replay would be ignored"),
])
def test_list_devices_refuses_what_it_would_ignore(verb, argv, ignored, tmp_path):
    """--list-devices lists and exits: a source given with it is not silently dropped."""
    argv = [a.format(clip=CLIP, out=tmp_path / "x.rec") for a in argv]
    err = _user_error(_cli(verb, *argv), "demo live" if verb == "demo" else verb)
    assert "--list-devices only lists the input devices and exits" in err and ignored in err
    assert not list(tmp_path.iterdir())


def test_record_lists_devices_without_out_but_records_only_with_it():
    listed = _cli("record", "--list-devices", "--json")
    assert listed.returncode == 0, listed.stderr
    assert isinstance(json.loads(listed.stdout)["devices"], list)
    assert "record needs OUT" in _user_error(_cli("record", "--file", CLIP), "record")


def test_stdin_from_a_terminal_is_refused_not_waited_on():
    """Reading a terminal would wait for typing forever."""
    master, slave = pty.openpty()
    try:
        out = _cli("listen", "--stdin", stdin=slave, timeout=30)
    finally:
        os.close(slave)
        os.close(master)
    assert "stdin is a terminal" in _user_error(out, "listen")


def test_an_audio_file_or_nothing_on_stdin_is_an_error(learner, tmp_path):
    x, _ = sf.read(CLIP, dtype="int16")
    sf.write(tmp_path / "a.wav", x, 16000)
    rec = tmp_path / "a.rec"
    out = _cli("record", rec, "--stdin", "--endpoint", learner,
               data=(tmp_path / "a.wav").read_bytes())
    err = _user_error(out, "record")
    assert "stdin holds a WAV file, not raw PCM" in err and "--file" in err
    assert not rec.exists()
    out_empty = _cli("listen", "--stdin", "--endpoint", learner, data=b"")
    assert "stdin: no audio (0 bytes before it ended)" in _user_error(out_empty, "listen")
    for run in (out, out_empty):  # said before the learner was asked for a session
        assert b"accepted by" not in run.stderr


def test_stdin_streams_the_last_short_block_like_a_file(learner, tmp_path):
    """1.45 s in 100 ms blocks: the last half block used to be dropped from stdin."""
    x, _ = sf.read(CLIP, dtype="int16")
    x = np.concatenate([x, x])[:23200]
    sf.write(tmp_path / "c.wav", x, 16000)
    common = ["--block-ms", "100", "--mode", "replay", "--endpoint", learner, "--json",
              "--quiet"]
    file_run = _cli("listen", "--file", tmp_path / "c.wav", *common)
    pipe_run = _cli("listen", "--stdin", *common, data=x.astype("<i2").tobytes())
    assert file_run.returncode == 0 and pipe_run.returncode == 0, pipe_run.stderr
    frames = [json.loads(r.stdout)["frames"] for r in (file_run, pipe_run)]
    assert frames[0] == frames[1] == 145


def test_stdin_source_yields_every_whole_sample():
    x = np.arange(250, dtype="<i2")
    with pytest.warns(UserWarning, match=r"stdin ended mid-sample: its last 1 byte\(s\)"):
        blocks = list(StdinSource(stream=io.BytesIO(x.tobytes() + b"\x01")).blocks())
    assert [len(b.samples) for b in blocks] == [160, 90]
    with pytest.raises(AudioError, match="stdin holds a FLAC file"):
        list(StdinSource(stream=io.BytesIO(CLIP.read_bytes())).blocks())


def test_folder_of_noise_is_replayed_but_noise_under_a_folder_is_skipped(tmp_path):
    noise = tmp_path / "_background_noise_"
    noise.mkdir()
    (noise / CLIP.name).write_bytes(CLIP.read_bytes())
    assert FolderSource(noise).files == [noise / CLIP.name]  # asked for: false-alarm runs
    err = _user_error(_cli("listen", "--folder", tmp_path), "listen")
    assert "no .wav or .flac files outside _background_noise_/" in err


def test_a_corrupt_file_in_a_folder_is_found_before_anything_is_streamed(learner, tmp_path):
    """Half-way through, the learner would already have learned from the files before."""
    (tmp_path / "yes").mkdir()
    (tmp_path / "yes" / CLIP.name).write_bytes(CLIP.read_bytes())
    (tmp_path / "yes" / "zz_broken.wav").write_bytes(b"RIFF....WAVEjunk")
    out = _cli("listen", "--folder", tmp_path, "--endpoint", learner)
    err = _user_error(out, "listen")
    assert "1 of 2 audio files cannot be read, so nothing was streamed: " in err
    assert "zz_broken.wav" in err and b"accepted by" not in out.stderr


@pytest.mark.parametrize("argv, says", [
    (["eprop", "--samples", "1000", "--steps", "10000"], "10,000,000 timesteps per repeat"),
    (["eprop", "--repeats", "5000"], "--repeats: 5000: must be in 1-1000"),
    (["sparse-bptt", "--batch", "100000"], "--batch: 100000: must be in 1-1024"),
    (["sparse-bptt", "--b-th", "inf"], "--b-th: 'inf': must be a finite number"),
    (["sparse-bptt", "--repeats", "0"], "--repeats: 0: must be in 1-1000"),
])
def test_bench_refuses_absurd_sizes_before_any_work(argv, says):
    out = _cli("bench", *argv, "--quiet", timeout=30)
    assert says in _user_error(out, f"bench {argv[0]}")


def test_bench_sparse_bptt_says_when_the_band_is_clipped_to_v_th():
    """B_th above v_th keeps what v_th keeps (psi is 0 beyond it): the JSON gives the band
    used and a note says so, instead of a B_th that changed nothing."""
    out = _cli("bench", "sparse-bptt", "--b-th", "5", "--batch", "2", "--repeats", "1",
               "--no-sweep", "--no-torch", "--json", timeout=300)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    res = json.loads(out.stdout)
    for net in ("kws", "shd"):
        assert res[net]["b_th"] == 5.0 and res[net]["band"] < 5.0
        assert res[net]["grad_cosine_vs_dense"] > 0.999999  # the whole band: dense
    assert out.stderr.decode().count("is above this network's v_th") == 2


def test_bench_eprop_exactness_is_on_a_batch_of_four_whatever_samples():
    """--samples 1 used to measure the exactness on a batch of one ("batch 4" said the JSON)."""
    runs = [json.loads(_cli("bench", "eprop", "--samples", n, "--steps", "20", "--repeats",
                            "1", "--quiet", "--json", timeout=120).stdout) for n in ("1", "4")]
    one, four = ({k: r[k] for k in ("grad_rel_err_by_matrix", "cosine_vs_bptt_with_recurrence",
                                    "firing_rate")} for r in runs)
    assert one == four


def _mini_dataset(root: Path, data_dir: Path, words: tuple[str, ...], n: int) -> Path:
    for w in words:
        (root / w).mkdir(parents=True)
        for f in sorted((data_dir / w).glob("*.wav"))[:n]:
            (root / w / f.name).symlink_to(f)
    return root


def test_bench_detector_without_keywords_is_an_error_not_a_division(data_dir, tmp_path):
    data = _mini_dataset(tmp_path / "d", data_dir, ("_unknown_",), 12)
    out = _cli("bench", "detector", "--data", data, "--streams", "1", "--clips-per-stream",
               "10", "--quiet")
    assert "no keyword clips (yes, no," in _user_error(out, "bench detector")


def test_bench_detector_says_when_it_runs_fewer_streams_than_asked(data_dir, tmp_path):
    data = _mini_dataset(tmp_path / "d", data_dir, ("yes", "no", "_unknown_"), 7)
    out = _cli("bench", "detector", "--data", data, "--streams", "5", "--clips-per-stream",
               "10", "--quiet", "--json", "--holds", "10", timeout=120)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert json.loads(out.stdout)["streams"] == 2
    assert "2 of the 5 streams asked for (--streams)" in out.stderr.decode()


def test_bench_frontend_says_when_it_times_fewer_clips_than_asked(data_dir):
    out = _cli("bench", "frontend", "--clips", "2", "--timed-clips", "5", "--repeats", "1",
               "--quiet", "--json", timeout=120)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert json.loads(out.stdout)["n_timed_clips"] == 2
    assert "timing 2 clips, not the 5 asked for (--timed-clips)" in out.stderr.decode()
