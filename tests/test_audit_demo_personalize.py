"""User-facing behaviour of personalize, demo live, data info and profile: a mistake is one
line and exit code 2 before any work, nothing is silently ignored, and the reports say
what a reader needs. Real files and subprocesses throughout."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from runtime.cli import main

REPO = Path(__file__).resolve().parents[1]
SPEAKER = "97f4c236"  # held out from the shipped model's pretraining, 52 clips
FAST = ("--backend", "reference", "--shots", "1", "--passes", "1")


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def _one_line_error(r: subprocess.CompletedProcess, verb: str, words: str) -> None:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith(f"edgeprop {verb}: error: ") and words in lines[-1], r.stderr
    assert "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def shipped():
    from edgeprop.shipped import SHIPPED_MODEL

    if not SHIPPED_MODEL.is_file():
        pytest.skip("shipped model not built yet (edgeprop pretrain)")
    return SHIPPED_MODEL


# ---------------------------------------------------------------- personalize
@pytest.mark.parametrize("flags, words", [
    (["--pull", "1"], "argument --pull: 1.0: must be in [0, 1)"),
    (["--passes", "-1"], "argument --passes: -1: must be >= 0"),
    (["--augment", "-2"], "argument --augment"),
    (["--user-norm", "nan"], "argument --user-norm"),
    (["--precision", "bogus"], "argument --precision: invalid choice"),
    (["--report", "plot.png"], "the plot is written beside it as plot.png"),
])
def test_odd_values_are_usage_errors_naming_the_option(data_dir, flags, words, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["personalize", "--data", str(data_dir), "--speaker", SPEAKER, *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("edgeprop personalize: error: ") and words in err


def test_an_empty_speaker_is_a_usage_error(data_dir, capsys):
    with pytest.raises(SystemExit):
        main(["personalize", "--data", str(data_dir), "--speaker", " "])
    assert "argument --speaker: empty" in capsys.readouterr().err


@pytest.mark.parametrize("flags, words", [
    (["--speaker", SPEAKER, "--min-clips", "5"], "drop --min-clips"),
    (["--speakers", SPEAKER, "--out", "x.npz"], "--out saves one speaker's checkpoint"),
    (["--speaker", SPEAKER, "--takes", "3"], "drop --takes"),
    (["--speaker", SPEAKER, "--precision", "fp16"], "--backend reference learns in fp32"),
    (["--speakers", " , "], "--speakers ' , ' names no speaker"),
])
def test_options_that_would_be_ignored_are_refused(shipped, data_dir, flags, words, capsys,
                                                   tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # --out x.npz must not land in the repo
    assert main(["personalize", "--data", str(data_dir), "--backend", "reference",
                 *flags]) == 2
    err = capsys.readouterr().err
    assert words in err and "loading" not in err  # before any work
    assert not (tmp_path / "x.npz").exists()


def test_bad_speakers_fail_before_any_is_adapted(shipped, data_dir):
    # 3a789a0d has one clip, an _unknown_ one: nothing to adapt on (was a speech_mean crash)
    r = _cli("personalize", "--data", str(data_dir), "--speaker", "3a789a0d", *FAST)
    _one_line_error(r, "personalize", "speaker '3a789a0d' has 1 clip here and no keyword clip")
    assert "loading" not in r.stderr
    r = _cli("personalize", "--data", str(data_dir), "--speakers", f"{SPEAKER},nobody", *FAST)
    _one_line_error(r, "personalize", "speaker 'nobody' has no clips in this folder")
    assert f"{SPEAKER}:" not in r.stderr  # the first speaker was not adapted, then lost


def test_a_speaker_with_few_clips_is_told_what_the_numbers_mean(shipped, data_dir):
    r = _cli("personalize", "--data", str(data_dir), "--speaker", " 03401E93 ",
             "--backend", "reference", "--shots", "2", "--passes", "1", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["speaker"] == "03401e93" and res["n_test"] < 10
    assert "no 'down'" in r.stderr and "1 of 'yes'" in r.stderr  # which keywords it lacks
    assert f"warning: only {res['n_test']} of 03401e93's clips are left" in r.stderr
    assert res["skipped"] is True and "it is kept as it is" in r.stderr


def test_single_speaker_report_has_the_numbers_behind_its_plot(shipped, data_dir, tmp_path):
    rep = tmp_path / "rep.md"
    r = _cli("personalize", "--data", str(data_dir), "--speaker", SPEAKER, *FAST,
             "--report", str(rep), "--json", "--skip-above", "0")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["skipped"] is False  # promised by the docs, also when the base was not kept
    text = rep.read_text()
    assert "Seen in pretraining: False" in text and "frontend moved toward the speaker" in text
    assert "| shots per keyword | adaptation utterances | accuracy |" in text
    for p in res["curve"]:
        assert f"| {p['shots']} | {p['n_adapt']:g} | {100 * p['accuracy']:.1f} % |" in text
    png = Path(res["plot"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.name in text


def test_the_result_names_the_command_it_was_run_with(data_dir, tmp_path, capsys):
    """Called as main([...]) (not from a shell), the result names those arguments, quoted
    as a shell would need them, not the calling program's sys.argv."""
    from runtime.cli import main

    folder = tmp_path / "my data"
    folder.symlink_to(data_dir)
    argv = ["personalize", "--data", str(folder), "--speaker", SPEAKER, *FAST, "--json",
            "--skip-above", "0", "--quiet"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["command"] == shlex.join(["edgeprop", *argv])


def test_a_model_without_a_silence_class_adapts_without_silence_rehearsal(data_dir,
                                                                         tmp_path, capsys):
    """Evaluate and replay take a model of other labels; personalize raised ValueError
    looking for _silence_ to rehearse."""
    import dataclasses

    from edgeprop.checkpoint import save_checkpoint
    from edgeprop.network import Params
    from edgeprop.shipped import load_shipped
    from runtime.cli import main

    ck = load_shipped()
    keep = [ck.labels.index(w) for w in ("yes", "no", "_unknown_")]
    p = ck.params
    three = Params(p.w_in, p.w_rec, p.w_out[keep], p.b_fb[:, keep])
    save_checkpoint(tmp_path / "three.npz", dataclasses.replace(ck.cfg, n_out=3), three,
                    frontend=ck.frontend, encoder=ck.encoder,
                    labels=["yes", "no", "_unknown_"], extra=ck.extra)
    assert main(["personalize", "--data", str(data_dir), "--speaker", SPEAKER, *FAST,
                 "--model", str(tmp_path / "three.npz"), "--skip-above", "0", "--json",
                 "--quiet"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n_adapt"] > 0 and res["n_test"] > 0 and 0 <= res["after"] <= 1


def test_time_per_learned_utterance_counts_only_what_was_learned(data_dir):
    """A speaker whose base was kept learned nothing: its check time is not a time per
    learned utterance (it read 0.7 s), and the sweep's figure leaves it out."""
    from runtime.personalization import summarize

    r = _cli("personalize", "--data", str(data_dir), "--speaker", "964e8cfd", "--backend",
             "reference", "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["skipped"] and res["n_learned"] == 0
    assert res["seconds_per_learned_utterance"] is None and res["adapt_seconds"] > 0
    kept = {"before": 0.9, "after": 0.9, "delta": 0.0, "n_adapt": 20, "n_learned": 0,
            "adapt_seconds": 0.7}
    learned = {**kept, "n_learned": 200, "adapt_seconds": 1.0}
    s = summarize([kept, learned])
    assert s["seconds_per_learned_utterance"] == pytest.approx(1.0 / 200)
    assert s["seconds_per_adapt_utterance"] == pytest.approx(1.7 / 40)  # checks count here
    assert summarize([kept])["seconds_per_learned_utterance"] is None


def test_ctrl_c_in_a_sweep_keeps_the_finished_speakers(data_dir):
    """After 9 of 37 speakers a Ctrl-C printed nothing: their results were lost."""
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "personalize", "--data",
                             str(data_dir), "--all-speakers", *FAST, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    said = ""
    deadline = time.monotonic() + 120
    while said.count(" -> ") < 2 and time.monotonic() < deadline:
        said += proc.stderr.readline()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, said + err
    res = json.loads(out)
    assert res["interrupted"] and res["n_planned"] > len(res["speakers"]) >= 2
    assert 0 <= res["mean_after"] <= 1 and "interrupted after" in err


def test_a_report_that_cannot_be_written_keeps_the_results(shipped, data_dir, tmp_path):
    (tmp_path / "rep.png").mkdir()  # the plot's place is taken: the write fails at the end
    r = _cli("personalize", "--data", str(data_dir), "--speaker", SPEAKER, *FAST,
             "--report", str(tmp_path / "rep.md"), "--json")
    _one_line_error(r, "personalize", f"cannot write {tmp_path / 'rep.png'}")
    assert ".tmp" not in r.stderr.splitlines()[-1]  # the user's file, not a temporary one
    res = json.loads(r.stdout)  # the measured numbers are not lost with the report
    assert {"before", "after", "n_test"} <= set(res)
    assert not list(tmp_path.glob(".*tmp*"))


# ---------------------------------------------------------------- data info
def test_data_info_says_a_file_is_not_a_folder(tmp_path):
    f = tmp_path / "clips.txt"
    f.write_text("x")
    _one_line_error(_cli("data", "info", str(f)), "data info", "a file, not a folder")
    _one_line_error(_cli("data", "info", ""), "data info", "argument dir: empty")


# ---------------------------------------------------------------- profile
@pytest.mark.parametrize("flags, words", [
    (["--samples", "100000"], "--samples 100000:"),
    (["--clock", "301"], "argument --clock: 301"),
    (["--pes", "0"], "argument --pes: 0: must be in 1-152"),
    (["--train-clips", "5"], "--train-clips only sets --variants"),
    (["--variants", "--samples", "2"], "--samples only sets the profile"),
])
def test_profile_options_are_checked(data_dir, flags, words):
    _one_line_error(_cli("profile", "--quiet", "--data", str(data_dir), *flags),
                    "profile", words)


def test_variants_table_is_printed_once_with_its_context(shipped, data_dir):
    r = _cli("profile", "--variants", "--train-clips", "2", "--val-clips", "4", "--quiet",
             "--data", str(data_dir))
    assert r.returncode == 0, r.stderr
    rows = [ln for ln in r.stderr.splitlines() if ln.startswith("fp32 ")]
    assert len(rows) == 1, r.stderr
    assert "model: shipped kws_srnn.npz" in r.stderr and "4 validation clips" in r.stderr
    assert "(current default " in r.stderr


# ---------------------------------------------------------------- demo live
def test_replay_at_8khz_says_it_was_resampled_and_stereo_is_refused(data_dir, tmp_path):
    import soundfile as sf
    from scipy.signal import resample_poly

    clip = sorted((data_dir / "yes").glob("*.wav"))[0]
    x, rate = sf.read(clip, dtype="float32")
    assert rate == 16000
    sf.write(tmp_path / "yes8k.wav", resample_poly(x, 1, 2).astype(np.float32), 8000)
    sf.write(tmp_path / "stereo.wav", np.stack([x, x], 1), 16000)
    r = _cli("demo", "live", "--replay", str(tmp_path / "yes8k.wav"), "--backend",
             "reference", "--json")
    assert r.returncode == 0, r.stderr
    assert "source: replay yes8k.wav (8000 Hz, resampled to 16 kHz)" in r.stderr
    assert json.loads(r.stdout)["replay_rate"] == 8000
    assert json.loads(r.stdout)["clipped_samples"] == 0 and "clipped" not in r.stderr
    _one_line_error(_cli("demo", "live", "--replay", str(tmp_path / "stereo.wav"),
                         "--backend", "reference"), "demo live", "2 channels")


def test_a_clipping_replay_is_shown_and_said(data_dir, tmp_path):
    """Audio at full scale is distorted (the scores suffer): the panel, the JSON and a
    closing note say how much clipped, instead of the demo just detecting less."""
    import soundfile as sf

    clip = sorted((data_dir / "no").glob("*.wav"))[0]
    x, _ = sf.read(clip, dtype="float32")
    loud = np.clip(x / np.abs(x).max() * 8, -1, 1).astype(np.float32)
    sf.write(tmp_path / "loud.wav", loud, 16000, subtype="FLOAT")
    r = _cli("demo", "live", "--replay", str(tmp_path / "loud.wav"), "--backend",
             "reference", "--json")
    assert r.returncode == 0, r.stderr
    n = int(np.count_nonzero(np.abs(loud) >= 0.999))
    assert n > 100 and json.loads(r.stdout)["clipped_samples"] == n
    assert f"note: the input clipped: {n} of " in r.stderr
    assert "the file was recorded too loud" in r.stderr


def test_a_replayed_clip_fires_its_own_word_only():
    """The shipped "yes" clip's first 0.2 s of near-silence fired "up" before "yes"; the
    "on" clip's fired "yes", whose refractory second then held "on" back."""
    for name, word in (("yes_0bac8a71_nohash_0", "yes"), ("on_c7dc7278_nohash_2", "on")):
        r = _cli("demo", "live", "--replay", str(REPO / "runtime" / "assets" / "clips" /
                                                  f"{name}.flac"),
                 "--backend", "reference", "--json")
        assert r.returncode == 0, r.stderr
        assert [d["label"] for d in json.loads(r.stdout)["detections"]] == [word]


def test_the_live_panel_shows_bars_level_drops_and_clipping():
    from rich.console import Console

    from runtime.commands.demo_live import LiveState, render

    state = LiveState(["yes", "no"])
    state.probs[:] = [0.75, 0.25]
    console = Console(record=True, width=100)
    console.print(render(state, 3, "replay x.wav", 1.0))
    quiet = console.export_text()
    assert "yes" in quiet and "0.75" in quiet and "dropped frames: 3" in quiet
    assert "clipping" not in quiet
    state.clipped = 12
    console.print(render(state, 3, "replay x.wav", 1.0))
    assert "clipping (12 samples)" in console.export_text()


def test_a_folder_without_some_of_the_models_words_says_so(data_dir, tmp_path):
    """Labels with no clips are neither adapted nor tested: the accuracies cover the rest."""
    for word in ("yes", "no", "_unknown_"):
        (tmp_path / word).mkdir()
        src = data_dir / word
        for f in sorted(src.glob("*.wav"))[:40] if src.is_dir() else []:
            (tmp_path / word / f.name).symlink_to(f)
    r = _cli("personalize", "--data", str(tmp_path), "--speaker", SPEAKER, *FAST, "--json")
    assert "Traceback" not in r.stderr
    assert f"note: {tmp_path} holds no clips of up, down, left, right, on, off, stop, go" \
        in r.stderr


def test_a_sweep_notes_speakers_with_few_clips_left_to_test(data_dir):
    r = _cli("personalize", "--data", str(data_dir), "--speakers", SPEAKER, "--shots", "5",
             "--passes", "1", "--backend", "reference", "--json")
    assert r.returncode == 0, r.stderr
    n_test = json.loads(r.stdout)["speakers"][0]["n_test"]
    assert n_test < 10
    assert f"note: 1 speaker ({SPEAKER}) had fewer than 10 clips left to test on" in r.stderr
