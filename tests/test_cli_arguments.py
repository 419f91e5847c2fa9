"""Wrong option values are one-line usage errors before any work starts (runtime.arg_types)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest

from edgeprop.shipped import SHIPPED_MODEL as SHIPPED
from runtime import arg_types as A
from runtime.cli import main


@pytest.mark.parametrize("text", ["tcp://127.0.0.1:5555", "tcp://*:5555", "tcp://127.0.0.1:*",
                                  "tcp://localhost:1", "tcp://[::1]:65535", "ipc:///tmp/x",
                                  "inproc://learner"])
def test_endpoints_that_zeromq_takes(text):
    assert A.endpoint(text) == text


@pytest.mark.parametrize("text, why", [
    ("tcp://nonsense", "not a ZeroMQ endpoint"), ("nonsense", "not a ZeroMQ endpoint"),
    ("tcp://127.0.0.1:99999", "not in 1-65535"), ("tcp://127.0.0.1:0", "not in 1-65535"),
    ("tcp://127.0.0.1:-1", "not a ZeroMQ endpoint"), ("ipc://", "names no path"),
])
def test_endpoints_zeromq_would_reject_or_silently_wrap(text, why):
    with pytest.raises(argparse.ArgumentTypeError, match=why):
        A.endpoint(text)
    assert A.optional_endpoint("") == ""


def test_a_connecting_option_names_one_peer():
    assert A.connect_endpoint("tcp://127.0.0.1:5555") == "tcp://127.0.0.1:5555"
    assert A.optional_connect_endpoint("") == ""
    for text in ("tcp://*:5555", "tcp://127.0.0.1:*"):
        with pytest.raises(argparse.ArgumentTypeError, match="can only bind"):
            A.connect_endpoint(text)


@pytest.mark.parametrize("kind, good, bad", [
    (A.nonneg_int, ["0", "7"], ["-1", "1.5", "x"]),
    (A.pos_int, ["1"], ["0", "-3"]),
    (A.pos_float, ["1e-4"], ["0", "-1", "nan", "inf", "x"]),
    (A.nonneg_float, ["0", "2.5"], ["-0.1", "nan", "-inf"]),
    (A.fraction, ["0", "0.99"], ["1", "-0.5", "nan"]),
    (A.sample_rate, ["16000", "44100", "48000"], ["0", "4000", "16k", "1e9"]),
])
def test_number_kinds(kind, good, bad):
    for text in good:
        kind(text)
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            kind(text)


def test_output_paths_are_checked_up_front(tmp_path):
    assert A.new_file(str(tmp_path / "a.rec")) == tmp_path / "a.rec"
    with pytest.raises(argparse.ArgumentTypeError, match="is a folder"):
        A.new_file(str(tmp_path))
    with pytest.raises(argparse.ArgumentTypeError, match="does not exist"):
        A.new_file(str(tmp_path / "absent" / "a.rec"))
    (tmp_path / "f").write_text("x")
    with pytest.raises(argparse.ArgumentTypeError, match="is a file"):
        A.output_folder(str(tmp_path / "f"))
    assert A.output_folder(str(tmp_path / "new")) == tmp_path / "new"
    with pytest.raises(argparse.ArgumentTypeError, match="is a folder"):
        A.new_file("")


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody can write in: a read-only tmpfs for root (who ignores modes)."""
    import os
    import subprocess

    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=16k", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_a_ready_file_that_cannot_be_written_stops_the_learner(full_dir, capsys):
    """Whoever waits for the ready file would wait for ever: serve stops, saying why."""
    assert main(["serve", "--bind", "tcp://127.0.0.1:*", "--control", "", "--quiet",
                 "--ready-file", str(full_dir / "ready.json")]) == 2
    err = capsys.readouterr().err
    assert "cannot write the ready file" in err and "No space left" in err
    assert len(err.strip().splitlines()) == 1


def test_an_output_path_that_cannot_be_written_is_refused_up_front(read_only_dir):
    for check, text in ((A.new_file, read_only_dir / "a.rec"),
                        (A.output_folder, read_only_dir),
                        (A.output_folder, read_only_dir / "new" / "deeper")):
        with pytest.raises(argparse.ArgumentTypeError, match="cannot make a file in"):
            check(str(text))


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="no /proc here")
def test_a_folder_that_refuses_files_is_refused_even_for_root():
    """/proc allows root by its mode bits (os.access says yes) but makes no file: the
    check tries a real file, so pretrain never trains for an hour toward it."""
    with pytest.raises(argparse.ArgumentTypeError, match="cannot make a file in /proc"):
        A.new_file("/proc/edgeprop-model.npz")


@pytest.mark.parametrize("argv, names", [
    (["serve", "--bind", "tcp://127.0.0.1:99999"], "port 99999"),
    (["serve", "--control", "tcp://nonsense"], "--control"),
    (["listen", "--block-ms", "0"], "--block-ms"),
    (["listen", "--mic-rate", "44"], "--mic-rate"),
    (["personalize", "--mic-rate", "x"], "--mic-rate"),
    (["run", "--lr", "inf"], "--lr"),
    (["run", "--per-label", "0"], "--per-label"),
    (["personalize", "--seed", "-1"], "--seed"),
    (["pretrain", "--speed", "-1"], "--speed"),
    (["serve", "--log-level", "bogus"], "--log-level"),
    (["listen", "--endpoint", "tcp://*:5555"], "can only bind"),
    (["serve", "--connect", "tcp://127.0.0.1:*"], "can only bind"),
    (["personalize", "--shots", "0"], "--shots"),
    (["pretrain", "--out", "/nonexistent-folder/x.npz"], "does not exist"),
    (["pretrain", "--b-th", "-1"], "--b-th"),
    (["demo", "live", "--device", " "], "leave --device out for the default"),
    (["serve", "--window", "5000"], "--window: 5000: must be in 1-1000"),
    (["run", "--threshold", "nan"], "--threshold"),
    (["pretrain", "--lr", "1e30"], "a learning rate is at most 1"),  # not a model of noise
    (["serve", "--lr", "2"], "a learning rate is at most 1"),
    (["evaluate", "--data", ""], "--data: empty"),  # not silently the current folder
    (["run", "--clips", " "], "--clips: empty"),
    (["regress", "--only", ","], "names nothing"),  # not "every recording", not "none"
    (["bench", "all", "--skip", " , "], "names nothing"),
])
def test_cli_usage_errors_are_one_line_exit_2(argv, names, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and names in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and f"see edgeprop {argv[0]}" in err
    assert err.rstrip().endswith("--help)")


@pytest.mark.skipif(shutil.which("flite") is None, reason="flite not installed")
def test_an_os_error_on_a_users_path_is_one_line_exit_2(tmp_path, capsys):
    """Not every path can be checked up front: an OSError naming one is still one line."""
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "synth"  # its parent is a file: mkdir fails
    assert main(["data", "synth", str(out), "--voices", "flite:slt", "--takes", "1",
                 "--words", "yes", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"edgeprop data synth: error: {tmp_path / 'file'}")
    assert "Not a directory" in err and len(err.strip().splitlines()) == 1


def test_serve_refuses_pub_with_workers(capsys):
    assert main(["serve", "--workers", "2", "--pub", "tcp://127.0.0.1:6103"]) == 2
    assert "--pub is not served with --workers" in capsys.readouterr().err
    assert main(["serve", "--workers", "2", "--connect", "tcp://127.0.0.1:6104"]) == 2
    assert "--connect is not used with --workers" in capsys.readouterr().err
    assert main(["serve", "--workers", "2", "--control", "tcp://127.0.0.1:6105"]) == 2
    assert "--control is not served with --workers" in capsys.readouterr().err
    assert main(["serve", "--workers", "2", "--name", "kws", "--control", ""]) == 2
    assert "--name is not used with --workers" in capsys.readouterr().err
    assert main(["personalize", "--data", ".", "--speakers", ",,"]) == 2
    assert "names no speaker" in capsys.readouterr().err
    # the microphone session checks its keywords before the microphone opens
    for words, said in ((",", "names no keyword"), ("", "names no keyword"),
                        ("_silence_", "not keywords of this model: ['_silence_']")):
        assert main(["personalize", "--interactive", "--keywords", words]) == 2
        assert said in capsys.readouterr().err
    assert main(["personalize", "--out", str(SHIPPED), "--data", "."]) == 2
    err = capsys.readouterr().err  # (a read-only install refuses the folder itself)
    assert "refusing to overwrite the base checkpoint" in err or "cannot make a file" in err


def test_microphone_options_are_refused_where_no_microphone_is_used(tmp_path, capsys):
    """--device and --mic-rate beside a file source would be silently ignored; a session
    with no take left to adapt on is refused before the microphone opens."""
    clip = tmp_path / "clip.wav"
    for argv, said in (
            (["demo", "live", "--replay", str(clip), "--mic-rate", "48000"],
             f"--mic-rate sets up a microphone, but the audio comes from --replay {clip}"),
            (["demo", "live", "--replay", str(clip), "--device", "2", "--mic-rate", "48000"],
             "--device and --mic-rate set up a microphone"),
            (["listen", "--file", str(clip), "--mic-rate", "44100"], "comes from --file"),
            (["listen", "--stdin", "--mic-rate", "44100"], "comes from --stdin"),
            (["personalize", "--data", str(tmp_path), "--device", "1"], "comes from --data"),
            (["personalize", "--data", str(tmp_path), "--interactive"], "give one of them"),
            (["personalize", "--interactive", "--takes", "2", "--holdout", "2"],
             "--holdout 2 leaves no take of --takes 2 to adapt on")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1, err


def test_serve_will_not_resume_another_models_checkpoint(tmp_path, capsys):
    """A learner.ckpt left by another model must not silently replace --model."""
    from edgeprop.checkpoint import save_checkpoint
    from edgeprop.network import ModelConfig, init_params
    from runtime.learner_node import resume_path

    cfg = ModelConfig(n_in=6, n_rec=9, n_out=4)
    save_checkpoint(resume_path(tmp_path), cfg, init_params(cfg, 0))
    assert main(["serve", "--checkpoint-dir", str(tmp_path), "--control", ""]) == 2
    err = capsys.readouterr().err
    assert "holds another model than the shipped model" in err
    assert "n_in=6 (expected 80), n_rec=9 (expected 120), n_out=4 (expected 12)" in err


def test_serve_will_not_resume_weights_learned_from_another_model_of_the_same_shape(
        tmp_path, capsys):
    """Every model pretrained with the defaults has the shipped one's shape and labels:
    a learner.ckpt (or a personal one) learned from one of them is refused, by the base
    params hash the learner records in it."""
    import dataclasses

    import pytest

    from edgeprop.checkpoint import save_checkpoint
    from edgeprop.errors import CheckpointError
    from edgeprop.network import Params
    from edgeprop.shipped import load_shipped
    from runtime.learner_node import LearnerCore, resume_path

    ck = load_shipped()
    other = dataclasses.replace(ck, params=Params(*(a * 0.5 for a in ck.params.arrays())))
    core = LearnerCore(other, backend="reference", checkpoint_dir=tmp_path / "d")
    core.save_checkpoint()
    core.close()
    assert main(["serve", "--checkpoint-dir", str(tmp_path / "d"), "--control", ""]) == 2
    err = capsys.readouterr().err
    assert "holds weights learned from another model (base params" in err
    # one written before learners recorded their base: its frontend must be the model's
    front = {**ck.frontend, "norm_mean": [0.0] * len(ck.frontend["norm_mean"])}
    (tmp_path / "old").mkdir()
    save_checkpoint(resume_path(tmp_path / "old"), ck.cfg, ck.params, frontend=front,
                    encoder=ck.encoder, labels=ck.labels)
    assert main(["serve", "--checkpoint-dir", str(tmp_path / "old"), "--control", ""]) == 2
    assert "its frontend or encoder differs" in capsys.readouterr().err
    # a personal checkpoint another model's learner left in the folder
    mine = LearnerCore(ck, backend="reference", checkpoint_dir=tmp_path / "d")
    save_checkpoint(mine._personal_path("spk"), ck.cfg, ck.params,
                    extra={"runtime": {"base_params_hash": core.base_hash}})
    with pytest.raises(CheckpointError, match="was learned from another model"):
        mine._personal_backend("spk")
    mine.close()


def test_serve_resumes_a_checkpoint_from_before_the_base_was_recorded_again_and_again(
        tmp_path):
    """Such a learner.ckpt passes (its frontend is the model's), and the learner must then
    record --model as its base, not its learned weights: else the next restart refused
    the learner's own checkpoint."""
    import argparse
    import dataclasses

    from edgeprop.checkpoint import params_hash, save_checkpoint
    from edgeprop.shipped import load_shipped
    from runtime.commands import serve
    from runtime.learner_node import resume_path

    ck = load_shipped()
    learned = dataclasses.replace(ck.params, w_out=ck.params.w_out * 0.99)
    save_checkpoint(resume_path(tmp_path), ck.cfg, learned, frontend=ck.frontend,
                    encoder=ck.encoder, labels=ck.labels,
                    extra={"runtime": {"updates": 5, "streams": {}}})
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args(["--checkpoint-dir", str(tmp_path), "--backend", "reference"])
    args.name = "learner"
    for _ in range(2):
        core = serve.build_core(args)
        assert core.base_hash == params_hash(ck.params) and core.updates == 5
        core.save_checkpoint()
        core.close()


def test_serve_names_the_resumed_file_whose_optimizer_state_does_not_fit(tmp_path, capsys):
    from edgeprop.checkpoint import save_checkpoint
    from edgeprop.shipped import load_shipped
    from runtime.learner_node import resume_path

    ck = load_shipped()
    save_checkpoint(resume_path(tmp_path), ck.cfg, ck.params, frontend=ck.frontend,
                    encoder=ck.encoder, labels=ck.labels,
                    optimizer_state={"kind": 1.0, "t": "x"})
    assert main(["serve", "--checkpoint-dir", str(tmp_path), "--control", "",
                 "--backend", "reference"]) == 2
    err = capsys.readouterr().err
    assert f"error: {resume_path(tmp_path)}: checkpoint optimizer state does not fit" in err


def test_serve_will_not_resume_a_checkpoint_with_other_labels(tmp_path, capsys):
    from edgeprop.checkpoint import save_checkpoint
    from edgeprop.shipped import load_shipped
    from runtime.learner_node import resume_path

    ck = load_shipped()
    other = [f"word{i}" for i in range(ck.cfg.n_out)]
    save_checkpoint(resume_path(tmp_path), ck.cfg, ck.params, frontend=ck.frontend,
                    encoder=ck.encoder, labels=other)
    assert main(["serve", "--checkpoint-dir", str(tmp_path), "--control", ""]) == 2
    err = capsys.readouterr().err
    assert "holds another model than the shipped model: labels ['word0'" in err
