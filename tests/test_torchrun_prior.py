"""make_prior.py under torchrun, two CPU processes (gloo): the folder is byte for byte the one a single process
writes, and an interrupted or failed group leaves a folder that the same command continues, with one process or
two."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import make_prior

pytestmark = pytest.mark.usefixtures("one_thread")  # results compared bit for bit; the processes get one thread too

REPO = Path(__file__).resolve().parents[1]
# 7 images in batches of 2: batches {0, 1}, {2, 3}, {4, 5}, {6}; with two ranks, round one is batches 0 and 1, round
# two batches 2 and 3, and round three batch 4 alone. torchrun reads --num as its own --numa-binding, so the
# processes are given --num-class-images. --device cpu: the same arithmetic in every run, GPU or not.
FLAGS = ["--class", "dog", "--num-class-images", "7", "--batch-size", "2", "--ddim_steps", "2", "--H", "64", "--W",
         "64", "--ckpt", "tiny", "--seed", "100", "--device", "cpu"]


def contents(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def torchrun(*args, processes=2, wait=True):
    """`python -m torch.distributed.run --standalone` (a free port of its own) with one thread per process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               *map(str, args)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, uninterrupted."""
    outdir = tmp_path_factory.mktemp("prior") / "dog"
    make_prior.main(FLAGS + ["--outdir", str(outdir)])
    return outdir


def test_torchrun_ranks_write_what_one_process_writes(reference, tmp_path):
    outdir = tmp_path / "dog"
    result = torchrun("make_prior.py", *FLAGS, "--outdir", outdir)
    assert result.returncode == 0, result.stderr
    assert contents(outdir) == contents(reference)  # the same PNG bytes, the manifest lines in the same order
    assert result.stdout.count("7 class images of 'photo of a dog'") == 1  # rank 0 alone speaks


def test_torchrun_continues_a_folder_left_unfinished(reference, tmp_path):
    """A folder as an interrupted run leaves it: the last manifest line cut short (00003.png exists but is not
    finished), 00004.png to 00006.png missing. Two ranks finish it: batch {2, 3} is made again but only 00003.png
    written, by rank 0, from the batch made on rank 1."""
    outdir = shutil.copytree(reference, tmp_path / "dog")
    lines = (outdir / "manifest.jsonl").read_text().splitlines(keepends=True)
    (outdir / "manifest.jsonl").write_text("".join(lines[:3]) + lines[3][:20])
    for name in ("00004.png", "00005.png", "00006.png"):
        (outdir / name).unlink()
    result = torchrun("make_prior.py", *FLAGS, "--outdir", outdir)
    assert result.returncode == 0, result.stderr
    assert contents(outdir) == contents(reference)


def test_torchrun_interrupted_by_ctrl_c_goes_on_with_one_process(tmp_path):
    """Ctrl-C to torchrun, which passes SIGINT on to each process, once rank 0 has written some images; the same
    command without torchrun then finishes the folder as an uninterrupted run makes it. 50 DDIM steps, so that
    the run is still going when the signal comes."""
    steps = FLAGS.index("--ddim_steps")
    flags = FLAGS[:steps] + FLAGS[steps + 2:]
    whole, outdir = tmp_path / "whole", tmp_path / "dog"
    run = torchrun("make_prior.py", *flags, "--outdir", outdir, wait=False)
    manifest, deadline = outdir / "manifest.jsonl", time.monotonic() + 120
    while not (manifest.exists() and manifest.read_text()) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    run.send_signal(signal.SIGINT)
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode != 0, "the run ended before the Ctrl-C"
    assert "interrupted: the images finished so far are in" in stdout, stderr
    assert 'make_prior.py", line' not in stderr  # no traceback from the processes (torchrun prints its own)
    finished = manifest.read_text().splitlines()
    assert 0 < len(finished) < 7
    make_prior.main(flags + ["--outdir", str(outdir)])
    make_prior.main(flags + ["--outdir", str(whole)])
    assert contents(outdir) == contents(whole)


FAILS_ON_RANK_1 = """
import sys
sys.path.insert(0, {repo!r})
import cli, make_prior

generate = make_prior.generate


def not_finite_in_batch_1(sd, prompts, seeds, **kwargs):  # batch {{2, 3}}, rank 1's in round one
    if seeds[0] == 102:
        raise ValueError("sampled latents are not finite")
    return generate(sd, prompts, seeds, **kwargs)


make_prior.generate = not_finite_in_batch_1
cli.run(make_prior.main)
"""


def test_torchrun_error_on_one_rank_stops_every_rank_with_one_line(reference, tmp_path):
    """Rank 1's batch fails: rank 0 writes the batch before it, as one process would, and says why in one line;
    every process stops in that round; the same command, here with one process, goes on from there."""
    script, outdir = tmp_path / "fails.py", tmp_path / "dog"
    script.write_text(FAILS_ON_RANK_1.format(repo=str(REPO)))
    result = torchrun(script, *FLAGS, "--outdir", outdir)
    assert result.returncode == 1
    error = (f"make_prior.py: error: sampled latents are not finite; the images finished so far are in {outdir}/; "
             "the same command goes on from there")
    assert result.stderr.count("make_prior.py: error:") == 1 and error in result.stderr.splitlines()
    assert 'make_prior.py", line' not in result.stderr  # rank 1 stopped too, not on a broken connection
    assert sorted(contents(outdir)) == ["00000.png", "00001.png", "manifest.jsonl"]
    make_prior.main(FLAGS + ["--outdir", str(outdir)])
    assert contents(outdir) == contents(reference)
