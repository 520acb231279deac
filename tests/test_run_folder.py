"""train.py's run folder: one process at a time (fresh runs and --resume alike, and a killed run never blocks its
own --resume), saves that are all-or-nothing for the folder, a folder left by a run that never saved, and train
states that are not what they should be."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from dreambooth.files import lock_folder
from tests.conftest import run

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def command(photos, out, *flags):
    return [sys.executable, "train.py", "--instance", str(photos / "instance"), "--prior", str(photos / "prior"),
            "--class", "dog", "--ckpt", "tiny", "--sample-every", "0", "--out", str(out), *flags]


def train_py(*args, **kwargs):
    return subprocess.Popen(*args, cwd=ROOT, env=os.environ | {"OMP_NUM_THREADS": "1"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def wait_for(path, process):
    deadline = time.monotonic() + 300
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"no {path.name} in 300 s"
        time.sleep(0.1)


def test_a_run_folder_is_one_runs_and_a_killed_run_resumes(photos, tmp_path):
    """While a run trains, a second run of its folder, fresh or --resume, stops in one line naming the folder and
    the running process, and the run goes on untouched. Killed with SIGKILL (no cleanup runs), it resumes at once."""
    out = tmp_path / "run"
    first = train_py(command(photos, out, "--steps", "100000", "--save-every", "2", "--log-every", "1"))
    try:
        wait_for(out / "train_state.pt", first)
        for flags in (command(photos, out, "--steps", "3"), [sys.executable, "train.py", "--resume", str(out)]):
            second = train_py(flags)
            stdout, stderr = second.communicate(timeout=300)
            flag = "--resume" if "--resume" in flags else "--out"
            assert second.returncode == 1 and stderr == (f"train.py: error: {flag} {out}: another process (pid "
                                                         f"{first.pid}) is working in it; one run at a time in a run "
                                                         "folder\n"), stderr
            assert "training" not in stdout  # refused before any work
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    saved = torch.load(out / "train_state.pt", weights_only=True)["step"]
    train.main(["--resume", str(out), "--steps", str(saved + 2)])
    assert [json.loads(row)["step"] for row in (out / "log.jsonl").read_text().splitlines()] == list(
        range(1, saved + 3))


def test_two_fresh_runs_started_together_make_one_run(photos, tmp_path):
    out = tmp_path / "run"
    runs = [train_py(command(photos, out, "--steps", "4", "--log-every", "1")) for _ in range(2)]
    results = sorted((process.wait(timeout=300), process.communicate()[1]) for process in runs)
    assert [code for code, _ in results] == [0, 1], results
    assert results[1][1].startswith(f"train.py: error: --out {out}") and results[1][1].count("\n") == 1
    assert [json.loads(row)["step"] for row in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


@pytest.mark.parametrize("lora", [[], ["--lora", "2", "--save-merged"]], ids=["full", "lora"])
def test_a_failed_save_leaves_the_folder_at_the_last_good_step(photos, tmp_path, monkeypatch, lora):
    """The model file is written, then the train state fails (a full disk): the folder must still hold step 2's
    model beside step 2's train state, and the message say that step 2 is what it holds."""
    out = tmp_path / "run"
    run(photos, out, "--steps", "2", "--save-every", "1", "--lr", "1e-3", *lora)
    files = ["model.safetensors"] + (["lora.safetensors"] if lora else [])
    before = {name: (out / name).read_bytes() for name in files}

    def disk_full(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"\0" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train.torch, "save", disk_full)
    with pytest.raises(SystemExit, match=rf"^train\.py: error: saving step 3 failed: .*No space left on device; "
                                         rf"stopped, the last good save \(step 2\) is in {out}$"):
        train.main(["--resume", str(out), "--steps", "3"])
    monkeypatch.undo()
    assert {name: (out / name).read_bytes() for name in files} == before
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 2
    assert sorted(p.name for p in out.iterdir()) == sorted([".lock", "log.jsonl", "train_state.pt", *files])


def test_a_run_that_stopped_before_its_first_save_can_start_again(photos, tmp_path, capsys):
    """A first run diverges (lr 1e8) before its only save: its folder holds a log and nothing saved. The same
    --out starts afresh, saying so, and --resume says why it cannot."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="loss is nan at step 2; stopped, nothing was saved"):
        run(photos, out, "--steps", "5", "--log-every", "1", "--save-every", "0", "--lr", "1e8")
    assert (out / "log.jsonl").exists() and not (out / "train_state.pt").exists()
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(out)])
    assert e.value.code == 2
    assert (f"--resume {out}: no train_state.pt in it (the run stopped before its first save; start it again with "
            f"--out {out})") in capsys.readouterr().err
    run(photos, out, "--steps", "2", "--log-every", "1")
    assert "holds only the log or previews of a run that stopped before its first save" in capsys.readouterr().out
    assert [json.loads(row)["step"] for row in (out / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_says_why_a_folder_has_no_train_state(photos, tmp_path, capsys):
    """--resume of a folder that does not exist, or whose run is still going and has not saved yet, says so in one
    line; a run whose setup fails leaves no folder of its own behind (only its lock would be in it)."""
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(tmp_path / "nothere")])
    assert e.value.code == 2 and f"--resume {tmp_path / 'nothere'}: no such folder" in capsys.readouterr().err
    busy = tmp_path / "busy"
    with lock_folder(busy), pytest.raises(SystemExit) as e:  # another process's run, before its first save
        train.main(["--resume", str(busy)])
    assert str(e.value) == (f"train.py: error: --resume {busy}: another process (pid {os.getpid()}) is working in it "
                            "and has not saved yet; one run at a time in a run folder")

    out = tmp_path / "runs" / "dog"
    with pytest.raises(SystemExit, match="--prior .*: no such folder"):
        run(photos, out, "--steps", "1", prior="nothere")
    assert (tmp_path / "runs").is_dir() and not out.exists()


class Payload:
    def __reduce__(self):
        return os.system, ("true",)


@pytest.mark.parametrize("damage", ["empty", "truncated", "hostile", "compressed", "not-a-state", "garbled-log"])
def test_a_damaged_train_state_or_log_is_one_line(photos, tmp_path, damage):
    out = tmp_path / "run"
    run(photos, out, "--steps", "1", "--log-every", "1")
    state = out / "train_state.pt"
    if damage == "empty":
        state.write_bytes(b"")
    elif damage == "truncated":
        state.write_bytes(state.read_bytes()[:state.stat().st_size // 2])
    elif damage == "hostile":
        torch.save({"step": 1, "payload": Payload()}, state)
    elif damage == "compressed":
        from tests.test_bad_files import rezip
        rezip(state, tmp_path / "zipped.pt").replace(state)
    elif damage == "not-a-state":
        torch.save({"step": "one"}, state)
    else:  # bytes that are not text in the log: dropped as rows cut short are; the run resumes
        with open(out / "log.jsonl", "ab") as log:
            log.write(b'{"step": 2, "loss": \xff\xfe}\n\x80\x81\n{"step": "x"}\n')
        train.main(["--resume", str(out), "--steps", "2"])
        assert [json.loads(row)["step"] for row in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
        return
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(out), "--steps", "2"])
    message = str(e.value)
    assert message.startswith(f"train.py: error: --resume {out}: ") and "\n" not in message, message
    assert str(state) in message and "weights_only" not in message
