"""What the CLI tells the user: mistakes named in one line (exit 2), --quiet kept quiet,
replay run with the recorded learner's settings. Real subprocesses and files."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from runtime_support import start_learner

from edgeprop.checkpoint import save_checkpoint
from edgeprop.network import KWS_LABELS, init_params
from edgeprop.shipped import load_shipped
from runtime.recording import read_recording

REPO = Path(__file__).resolve().parents[1]
CLIP = REPO / "runtime" / "assets" / "clips" / "left_42beb5eb_nohash_0.flac"
DETECTOR = {"window": 20, "threshold": 0.3, "hold": 5, "refractory": 30}  # not serve's defaults


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime.cli", *map(str, argv)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def _user_error(out: subprocess.CompletedProcess, verb: str) -> str:
    """The one stderr line of a user mistake: exit 2, no traceback."""
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert out.stderr.startswith(f"edgeprop {verb}: error: ")
    return out.stderr.strip()


def _shipped_with(path: Path, n_out: int, labels: list[str] | None) -> Path:
    """The shipped frontend and encoder with `n_out` outputs named by `labels`."""
    ck = load_shipped()
    cfg = dataclasses.replace(ck.cfg, n_out=n_out)
    save_checkpoint(path, cfg, init_params(cfg, 0), frontend=ck.frontend, encoder=ck.encoder,
                    labels=labels)
    return path


@pytest.mark.parametrize("labels, named", [
    (["a", "a", "a"], "'a' (3 times); each of its 3 outputs needs a label of its own"),
    (["yes", *KWS_LABELS[:-1]], "'yes' (2 times); each of its 12 outputs needs a label"),
])
def test_evaluate_refuses_labels_that_repeat(labels, named, data_dir, tmp_path):
    model = _shipped_with(tmp_path / "m.npz", len(labels), labels)
    err = _user_error(_cli("evaluate", "--model", model, "--data", data_dir, "--quiet"),
                      "evaluate")
    assert f"checkpoint labels repeat: {named}" in err and "no clips found" not in err


@pytest.mark.parametrize("labels, says", [
    (None, "checkpoint names no labels, so clips get the 12 default ones, but it has 5 "
           "outputs: clips of right, on, off, stop, go, _silence_, _unknown_ would have no "
           "output; it needs one label per output"),
    (list(KWS_LABELS), "checkpoint has 12 labels but 5 outputs: clips of right, on, off, "
                       "stop, go, _silence_, _unknown_ would have no output"),
])
def test_profile_says_the_clip_labels_do_not_fit_the_outputs(labels, says, data_dir, tmp_path):
    model = _shipped_with(tmp_path / "m.npz", 5, labels)
    err = _user_error(_cli("profile", "--model", model, "--data", data_dir, "--quiet"),
                      "profile")
    assert says in err and "mean loss" not in err


@pytest.fixture(scope="module")
def learner():
    """The shipped model on a reference learner in this process, with DETECTOR."""
    node = start_learner(load_shipped(), detector=DETECTOR)
    try:
        yield node.endpoints["data_router"]
    finally:
        node.stop()
        node.core.close()


@pytest.fixture(scope="module")
def recording(learner, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`edgeprop record` of one labelled clip (not quiet), and that run."""
    rec = tmp_path_factory.mktemp("rec") / "left.rec"
    out = _cli("record", rec, "--file", CLIP, "--label", "left", "--endpoint", learner)
    assert out.returncode == 0, out.stderr[-2000:]
    return rec, out


def test_listen_quiet_prints_only_errors_and_the_json(learner, recording):
    _, loud = recording
    assert "accepted by" in loud.stderr and "100 frames" in loud.stderr  # what --quiet drops
    quiet = _cli("listen", "--file", CLIP, "--endpoint", learner, "--quiet")
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")
    quiet_json = _cli("listen", "--file", CLIP, "--endpoint", learner, "--quiet", "--json")
    assert quiet_json.returncode == 0 and quiet_json.stderr == ""
    assert json.loads(quiet_json.stdout)["frames"] == 100
    err = _user_error(_cli("listen", "--file", CLIP, "--label", "banana", "--endpoint",
                           learner, "--quiet"), "listen")
    assert "unknown label 'banana'" in err


def test_replay_keeps_the_recorded_detector_unless_an_option_is_given(recording):
    rec, _ = recording
    same = _cli("replay", rec, "--json", "--quiet")
    assert same.returncode == 0, same.stderr[-2000:]
    res = json.loads(same.stdout)
    recorded = {**DETECTOR, "ignore": ["_silence_", "_unknown_"], "warmup": "rest"}
    assert res["detector"] == recorded and res["identical"] and res["detections"] > 0
    strict = _cli("replay", rec, "--threshold", "0.99", "--json", "--quiet")
    assert strict.returncode == 0, strict.stderr[-2000:]
    res = json.loads(strict.stdout)
    assert res["detector"] == {**recorded, "threshold": 0.99}  # the others as recorded
    assert res["max_abs_diff"] == 0.0 and not res["detections_equal"]


def test_replay_help_says_the_detector_defaults_to_the_recordings():
    out = _cli("replay", "--help")
    text = " ".join(out.stdout.split())  # as argparse wraps it or not
    assert out.returncode == 0 and text.count("(default: the recording's)") == 4


def test_a_recording_decodes_its_messages_once(recording):
    rec = read_recording(recording[0])
    first, again = rec.outputs(), rec.outputs()
    assert len(first) == len(again) > 0 and first is not again  # each call its own list...
    assert all(a is b for a, b in zip(first, again, strict=True))  # ...of the same messages
    assert rec.inputs()[0] is rec.inputs()[0]


def test_wrong_paths_and_missing_sub_verbs_are_named(tmp_path):
    assert "a folder, not an audio file" in _user_error(
        _cli("demo", "live", "--replay", tmp_path, "--no-ui"), "demo live")
    assert "no such folder" in _user_error(_cli("listen", "--folder", tmp_path / "nope"),
                                           "listen")
    import soundfile as sf

    sf.write(tmp_path / "r1.wav", [0.0] * 64, 1, subtype="FLOAT")  # a damaged header
    assert "sample rate 1 Hz is not an audio rate" in _user_error(
        _cli("demo", "live", "--replay", tmp_path / "r1.wav", "--no-ui"), "demo live")
    out = _cli("data")
    assert out.returncode == 2 and "usage: edgeprop data {info, synth}" in out.stderr
    assert _cli("data", "--help").returncode == 0


def test_a_bind_error_names_its_cause(tmp_path):
    far = "ipc://" + str(tmp_path / "no-such-folder" / "sock")
    out = _cli("serve", "--bind", far, "--control", "", "--quiet")  # quiet: the error alone
    err = _user_error(out, "serve")
    assert "check the endpoint" in err and "another learner" not in err


def test_a_warning_is_one_line_naming_the_command(capsys):
    """Not a source path, a line number and a line of code under it."""
    import warnings

    from runtime.cli import _one_line_warnings

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with _one_line_warnings("edgeprop pretrain"):
            warnings.warn("recurrent layer is near silent", UserWarning, stacklevel=1)
        shown = warnings.showwarning
    assert capsys.readouterr().err == "edgeprop pretrain: warning: recurrent layer is near silent\n"
    assert shown is not None and shown.__name__ != "show"  # put back afterwards
