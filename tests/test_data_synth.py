"""TTS keywords (flite / festival): Speech Commands layout, cached, missing voices named."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from edgeprop.datasets import load_clip, scan_speech_commands
from edgeprop.errors import DatasetError
from edgeprop.synth import fit_one_second, parse_voice, synthesize

needs_flite = pytest.mark.skipif(shutil.which("flite") is None,
                                 reason="flite binary not installed (apt-get install flite)")
needs_festival = pytest.mark.skipif(shutil.which("text2wave") is None,
                                    reason="festival not installed (apt-get install festival "
                                           "festvox-kallpc16k)")


@needs_flite
def test_flite_keywords_in_speech_commands_layout_and_cached(tmp_path):
    out = tmp_path / "synth"
    res = synthesize(out, words=["yes", "marvin"], voices=["flite:slt", "flite:nosuchvoice"],
                     takes=2)
    assert res["made"] == 4 and res["reused"] == 0
    assert "flite:nosuchvoice" in res["missing_voices"]
    assert "not installed" in res["missing_voices"]["flite:nosuchvoice"]
    scan = scan_speech_commands(out)
    counts = scan.counts_by_label()
    assert counts["yes"] == 2 and counts["_unknown_"] == 2  # marvin -> _unknown_
    spk = {c.speaker for c in scan.clips}
    assert spk == {parse_voice("flite:slt").speaker}
    x = load_clip(scan.clips[0])
    assert x.shape == (16000,) and 0.4 < np.abs(x).max() <= 0.5 + 1e-3
    again = synthesize(out, words=["yes", "marvin"], voices=["flite:slt"], takes=2)
    assert again["made"] == 0 and again["reused"] == 4


@needs_festival
def test_festival_voice(tmp_path):
    res = synthesize(tmp_path, words=["go"], voices=["festival:kal_diphone"], takes=1)
    assert res["made"] == 1
    assert scan_speech_commands(tmp_path).counts_by_label()["go"] == 1


def test_no_voice_available_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="no TTS voice available"):
        synthesize(tmp_path, words=["yes"], voices=["flite:nosuchvoice"])
    with pytest.raises(DatasetError, match="flite:<voice>"):
        parse_voice("espeak:en")


def test_fit_one_second_centres_and_normalises():
    x = np.concatenate([np.zeros(3000), np.ones(2000) * 0.2, np.zeros(100)])
    y = fit_one_second(x)
    assert y.shape == (16000,) and y.max() == pytest.approx(0.5)
    assert np.flatnonzero(y)[0] == 7000


@needs_flite
def test_cli_synth_then_info(tmp_path):
    out = tmp_path / "s"
    cmd = [sys.executable, "-m", "runtime.cli", "data", "synth", str(out), "--voices",
           "flite:kal16", "--words", "no", "--takes", "1", "--json", "--quiet"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["clips"] == 1
    info = subprocess.run([sys.executable, "-m", "runtime.cli", "data", "info", str(out),
                           "--json"], capture_output=True, text=True, timeout=60)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["counts_by_label"]["no"] == 1


@pytest.mark.parametrize("word", ["", "../../etc/evil", "yes,no", "a/b"])
def test_words_that_are_not_folder_names_are_refused_before_any_write(tmp_path, word):
    with pytest.raises(DatasetError, match="not a word"):
        synthesize(tmp_path / "out", words=[word], voices=["flite:slt"], takes=1)
    assert not (tmp_path / "out").exists()


def test_a_real_dataset_is_not_written_into_and_requests_are_taken_once(tmp_path, data_dir):
    """Into a real dataset the voices would also land in its validation split; "Yes"
    made a Yes/ folder counted as _unknown_; a word or voice given twice counted twice."""
    from edgeprop.synth import plan_synthesis

    with pytest.raises(DatasetError, match=r"clips edgeprop data synth did not make .*a "
                                           "real dataset"):
        plan_synthesis(data_dir, words=["yes"], voices=["flite:slt"], takes=1)
    with pytest.raises(DatasetError, match="'Yes': words name class folders, which are "
                                           "lowercase; give yes"):
        plan_synthesis(tmp_path / "out", words=["Yes"], voices=["flite:slt"], takes=1)
    if shutil.which("flite") is not None:
        plan = plan_synthesis(tmp_path / "out", words=["yes", "yes", "no"],
                              voices=["flite:slt", "slt"], takes=1)
        assert plan.words == ("yes", "no") and len(plan.voices) == 1 and plan.clips == 2


@pytest.mark.parametrize("argv, said", [
    (["--words", "a/b"], "not a word: 'a/b'"),
    (["--voices", "flite:nosuchvoice"], "no TTS voice available"),
])
def test_a_bad_request_is_one_line_before_any_progress_bar(tmp_path, capsys, argv, said):
    from runtime.cli import main

    assert main(["data", "synth", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert said in err and len(err.strip().splitlines()) == 1 and "synthesising" not in err
    assert not (tmp_path / "out").exists()
