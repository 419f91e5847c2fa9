"""`edgeprop pretrain` and `edgeprop evaluate` end to end, through the real CLI in
subprocesses, on a tiny real subset of speech_commands_dev."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgeprop.checkpoint import load_checkpoint, params_hash
from edgeprop.frontend import FrontendConfig
from edgeprop.network import KWS_LABELS

REPO = Path(__file__).resolve().parents[1]
TINY = ["--max-clips", "60", "--epochs", "2", "--n-aug", "1", "--seed", "3", "--quiet"]


def _env(**extra: str) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", **extra)


def _cli(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    env = env or _env()
    return subprocess.run([sys.executable, "-m", "runtime.cli", *map(str, args)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


def _json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pretrain")


@pytest.fixture(scope="module")
def tiny_model(work: Path, data_dir: Path) -> tuple[Path, dict]:
    out = work / "tiny.npz"
    res = _json(_cli("pretrain", "--data", data_dir, "--out", out, "--cache-dir",
                     work / "cache", "--json", "--compare-dense", *TINY))
    return out, res


@pytest.fixture(scope="module")
def eval_folder(work: Path, data_dir: Path) -> Path:
    """A never-seen folder in the Speech Commands layout: 2 keywords, an unknown word
    ('bed', not one of the labels) and a silence clip, as symlinks to real clips."""
    root = work / "evalset"
    picks = {"yes": sorted((data_dir / "yes").glob("*.wav"))[-3:],
             "stop": sorted((data_dir / "stop").glob("*.wav"))[-2:],
             "_silence_": sorted((data_dir / "_silence_").glob("*.wav"))[-1:]}
    for word, files in picks.items():
        (root / word).mkdir(parents=True)
        for f in files:
            (root / word / f.name).symlink_to(f)
    (root / "bed").mkdir()
    for f in sorted((data_dir / "_unknown_").glob("bed_*"))[-2:]:
        (root / "bed" / f.name.removeprefix("bed_")).symlink_to(f)
    return root


def test_pretrain_writes_a_complete_checkpoint_and_record(tiny_model):
    out, res = tiny_model
    assert res["epochs_run"] == 2 and res["method"] == "sparse_bptt"
    assert 0.0 <= res["val_accuracy"] <= 1.0 and res["n_val"] > 0
    assert res["data_info"]["n_train"] + res["n_val"] == 60
    assert res["comparison"]["method"] == "dense_bptt"
    assert 0.0 <= res["comparison"]["val_accuracy"] <= 1.0
    ck = load_checkpoint(out)
    assert ck.cfg.n_weights == 25440
    assert ck.labels == list(KWS_LABELS)
    assert ck.encoder["name"] == "current"
    fcfg = FrontendConfig.from_dict(ck.frontend)
    assert fcfg.normalized and fcfg.n_features == ck.cfg.n_in
    # the training set's speech mean, in this frontend's units, for personalization
    stats = ck.extra["frontend_stats"]
    assert stats["frontend_hash"] == fcfg.hash() and len(stats["speech_mean"]) == fcfg.n_mels
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["seed"] == 3 and "pretrain" in record["command"]
    assert not (out.parent / (out.name + ".resume.npz")).exists()


def test_resumed_run_equals_uninterrupted_run(tiny_model, work, data_dir):
    out, _ = tiny_model
    split = work / "split.npz"
    common = ["pretrain", "--data", data_dir, "--out", split, "--cache-dir", work / "cache",
              "--json", *TINY]
    stopped = _cli(*common, "--stop-after", "1")
    first = _json(stopped)
    # --quiet: no per-epoch lines, but the one saying how to go on
    assert "epoch 1/2:" not in stopped.stderr and "--resume" in stopped.stderr
    resume_file = work / "split.npz.resume.npz"
    assert first["stopped_after"] == 1 and resume_file.is_file() and not split.exists()
    second = _json(_cli(*common, "--resume"))
    assert second["epochs_run"] == 2 and not resume_file.exists()
    assert params_hash(load_checkpoint(split).params) == params_hash(load_checkpoint(out).params)
    assert second["val_accuracy"] == pytest.approx(tiny_model[1]["val_accuracy"])


def test_evaluate_on_a_never_seen_folder(tiny_model, eval_folder, work):
    out, _ = tiny_model
    res = _json(_cli("evaluate", "--model", out, "--data", eval_folder, "--cache-dir",
                     work / "cache", "--json", "--quiet"))
    assert res["n"] == 8 and res["labels"] == list(KWS_LABELS)
    assert res["per_class_n"]["yes"] == 3 and res["per_class_n"]["_unknown_"] == 2
    assert res["per_class"]["no"] is None  # absent class
    cm = res["confusion"]
    assert sum(map(sum, cm)) == 8 and len(cm) == 12
    assert res["accuracy"] == pytest.approx(sum(cm[i][i] for i in range(12)) / 8)


def test_evaluate_shipped_model_on_real_clips(eval_folder, work):
    from edgeprop.shipped import SHIPPED_MODEL

    assert SHIPPED_MODEL.is_file(), "the shipped model is missing (edgeprop pretrain)"
    res = _json(_cli("evaluate", "--data", eval_folder, "--cache-dir", work / "cache",
                     "--json", "--quiet"))
    assert res["n"] == 8 and res["model"] == str(SHIPPED_MODEL)
    assert 0.0 <= res["accuracy"] <= 1.0


def test_evaluate_notes_a_folder_of_one_word(data_dir, work):
    one = work / "one_word" / "yes"
    one.mkdir(parents=True)
    for f in sorted((data_dir / "yes").glob("*.wav"))[:3]:
        (one / f.name).symlink_to(f)
    proc = _cli("evaluate", "--data", one.parent, "--cache-dir", work / "cache", "--json",
                "--quiet")
    assert _json(proc)["n"] == 3
    assert "every clip is 'yes', so this is that word's recall alone" in proc.stderr


def test_bad_folders_and_checkpoints_are_one_line_errors(tiny_model, work):
    out, _ = tiny_model
    junk = work / "junk.npz"
    junk.write_text("not a checkpoint")
    empty = work / "empty_dir"
    empty.mkdir()
    cases = [
        (("evaluate", "--model", out, "--data", work / "nope"), "no such folder"),
        (("evaluate", "--model", out, "--data", empty), "no class folders"),
        (("evaluate", "--model", junk, "--data", empty), "not an edgeprop checkpoint"),
        (("pretrain", "--data", work / "nope", "--out", work / "x.npz", "--quiet"),
         "no such folder"),
        (("pretrain", "--data", empty, "--out", work / "x.npz", "--quiet"), "no class folders"),
        # before any data is prepared
        (("pretrain", "--data", empty, "--out", work / "x.npz", "--resume", "--quiet"),
         "nothing to resume"),
        (("pretrain", "--freq-warp", "0.7", "--out", work / "x.npz"),
         "--freq-warp: 0.7: must be in [0, 0.5)"),
        (("pretrain", "--weight-decay", "-1", "--out", work / "x.npz"),
         "--weight-decay: -1.0: must be >= 0"),
        (("pretrain", "--data", junk, "--out", work / "x.npz"), "junk.npz: not a folder"),
        (("evaluate", "--model", out, "--data", junk), "junk.npz: not a folder"),
        (("pretrain", "--dense", "--b-th", "0.3", "--out", work / "x.npz"),
         "--b-th is the band of sparse BPTT, which --dense does not use"),
        (("pretrain", "--synth", work / "nope", "--out", work / "x.npz"),
         "--synth " + str(work / "nope") + ": no such folder"),
        # the memory the augmented copies need, not a numpy MemoryError traceback
        (("pretrain", "--n-aug", "100000000", "--max-clips", "60", "--out", work / "x.npz",
          "--cache-dir", work / "cache-ram", "--quiet"), "GiB of memory (this machine has "),
    ]
    for args, msg in cases:
        proc = _cli(*args)
        assert proc.returncode == 2, proc.stderr
        assert msg in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    # said before the features were computed (they take minutes on the whole folder)
    assert not [p for p in (work / "cache-ram").rglob("*") if p.is_file()]


def test_a_folder_of_unnamed_clips_says_why_it_has_none(work, data_dir):
    root = work / "unnamed"
    (root / "yes").mkdir(parents=True)
    for i, f in enumerate(sorted((data_dir / "yes").glob("*.wav"))[:2]):
        (root / "yes" / f"take{i}.wav").symlink_to(f)
    proc = _cli("evaluate", "--data", root, "--quiet")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "all 2 files were skipped" in proc.stderr
    assert "take0.wav: name has no '<8 hex>_nohash_<n>' speaker id" in proc.stderr


def test_resume_file_is_never_overwritten_nor_resumed_with_other_settings(work, data_dir):
    out = work / "steps.npz"
    common = ["pretrain", "--data", data_dir, "--out", out, "--cache-dir", work / "cache",
              "--json", "--max-clips", "60", "--epochs", "3", "--n-aug", "1", "--seed", "3",
              "--quiet", "--stop-after", "1"]
    assert _json(_cli(*common))["stopped_after"] == 1
    resume_file = work / "steps.npz.resume.npz"
    before = resume_file.read_bytes()
    cases = [
        # a fresh run (--resume forgotten) would overwrite the interrupted one
        ((), "holds an interrupted run: add --resume to continue it"),
        (("--resume", "--lr", "0.01"), "other settings: --lr 0.002 (now --lr 0.01)"),
        (("--resume", "--dense"), "sparse BPTT (now --dense)"),
        (("--resume", "--max-clips", "50"), "--max-clips 60 (now 50)"),
    ]
    for extra, msg in cases:
        proc = _cli(*common, *extra)
        assert proc.returncode == 2 and msg in proc.stderr, proc.stderr
        # one line: refused before the data is prepared ("data: ..." not said)
        assert len(proc.stderr.strip().splitlines()) == 1
    assert resume_file.read_bytes() == before
    # the same command plus --resume goes on by --stop-after epochs each time
    assert _json(_cli(*common, "--resume"))["stopped_after"] == 2
    shorter = _cli(*common, "--resume", "--epochs", "1")  # would write 2 epochs as "1"
    assert shorter.returncode == 2
    assert "has already run 2 epochs, more than --epochs 1; give --epochs 2" in shorter.stderr
    done = _json(_cli(*common, "--resume"))
    assert done["epochs_run"] == 3 and out.is_file() and not resume_file.exists()


def test_odd_folder_and_unwritable_cache_are_notes_not_errors(work, data_dir):
    """A stray file, classes without clips and a cache that cannot be written are said,
    and the commands still finish (a cache only saves time)."""
    root = work / "two_words"
    for word in ("yes", "no"):
        (root / word).mkdir(parents=True)
        for f in sorted((data_dir / word).glob("*.wav"))[:6]:
            (root / word / f.name).symlink_to(f)
    (root / "yes" / "notes.txt").write_text("recorded on tuesday")
    blocker = work / "cache_is_a_file"
    blocker.write_text("")
    env = _env(EDGEPROP_CACHE=str(blocker / "sub"))
    out = work / "two_words.npz"
    proc = _cli("pretrain", "--data", root, "--out", out, "--epochs", "1", "--n-aug", "0",
                "--quiet", env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"note: skipped {root / 'yes' / 'notes.txt'}: not a .wav file" in proc.stderr
    assert "note: no training clips of up, down" in proc.stderr
    assert f"note: feature cache {blocker / 'sub'} is not writable" in proc.stderr
    proc = _cli("evaluate", "--model", out, "--data", root, "--json", "--quiet", env=env)
    assert _json(proc)["n"] == 12
    assert "not a .wav file" in proc.stderr and "is not writable" in proc.stderr


def test_ctrl_c_keeps_the_finished_epochs_and_says_how_to_resume(work, data_dir):
    import signal
    import time

    out = work / "long.npz"
    resume_file = work / "long.npz.resume.npz"
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "pretrain", "--data", str(data_dir), "--out",
         str(out), "--cache-dir", str(work / "cache"), "--max-clips", "60", "--n-aug", "1",
         "--epochs", "100000", "--quiet"],
        cwd=REPO, env=_env(), stderr=subprocess.PIPE, text=True,
        # a shell without job control starts background jobs with SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not resume_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert resume_file.exists()
        proc.send_signal(signal.SIGINT)  # mid-epoch, most likely inside a numba kernel
        err = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "SystemError" not in err
    assert f"kept in {resume_file}; continue with the same flags plus --resume" in err
    assert load_checkpoint(resume_file).extra["next_epoch"] >= 1
