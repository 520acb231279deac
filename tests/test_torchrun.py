"""train.py under torchrun, on the CPU: two processes joined through gloo train as one. Each draws the whole batch
and trains on its half; the gradients are averaged, so the two take the step one process takes on the whole batch.
Ctrl-C, resume and a diverging loss stop or continue the whole group."""
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import train
import train_settings
import train_setup
from tests.test_concepts import two_concepts

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")  # as the processes below, which torchrun gives one thread each
CPU = torch.device("cpu")
ENV = os.environ | {"OMP_NUM_THREADS": "1"}  # torchrun gives each process one thread: so does the single process


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def command(photos, out, *flags, processes=1):
    """train.py on the tiny model at 64 px, as one process or under torchrun with `processes`."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
              str(free_port())] if processes > 1 else [sys.executable]
    return [*launch, "train.py", "--instance", str(photos / "instance"), "--prior", str(photos / "prior"), "--class",
            "dog", "--ckpt", "tiny", "--device", "cpu", "--resolution", "64", "--sample-every", "0", "--log-every",
            "1", "--batch-size", "2", "--out", str(out), *flags]


def run_train(photos, out, *flags, processes=1):
    done = subprocess.run(command(photos, out, *flags, processes=processes), cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out / "train_state.pt", weights_only=True), done.stdout


def logged(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def in_process_step(photos, *flags):
    """train.py's step on the tiny model, made in this process as main() makes it; and each trained parameter's name."""
    args, _ = train_settings.parse_args(["--instance", str(photos / "instance"), "--prior", str(photos / "prior"),
                                         "--class", "dog", "--ckpt", "tiny", "--device", "cpu", "--resolution", "64",
                                         "--batch-size", "2", *flags])
    train_settings.resolve_defaults(args)
    with contextlib.redirect_stdout(io.StringIO()):
        sd, images, taken = train_setup.load_model_and_photos(args, train_settings.run_concepts(args), CPU)
        step, trained = train.make_step(sd, images, taken, args, CPU)
    names = {p: f"{m}.{n}" for m, module in trained.items() for n, p in module.named_parameters()}
    return step, names, args.seed


def mean_of_halves(photos, flags):
    """{name: gradient}: in this process, the gradient of each half of the step's first batch (the subject photo and
    prior image each process of two trains on), averaged. Nothing distributed: what two processes should compute."""
    step, names, seed = in_process_step(photos, *flags, "--no-step-in-backward", "--lr", "0")
    halves = []
    step.optimizer.step = lambda: halves.append({names[p]: p.grad.clone() for p in names})  # what AdamW would read
    for rank in range(2):
        step.batches.share = (rank, 2)
        step.learn(*step.batches.draw(torch.Generator().manual_seed(seed)))
    return {name: (halves[0][name] + halves[1][name]) / 2 for name in halves[0]}


@pytest.mark.parametrize("flags", [[], ["--no-step-in-backward"],
                                   ["--lora", "4", "--train-text-encoder", "--prior-loss", "base"]],
                         ids=["step-in-backward", "step-after-backward", "lora-text-encoder-base-prior"])
def test_two_processes_take_the_step_of_one(photos, tmp_path, flags):
    """One step of 2 subject + 2 prior images under torchrun, each of two processes training on one of each: the
    losses logged are the whole batch's, as one process logs them; and the gradient AdamW took (its first moment, a
    tenth of the gradient after one step) is the mean of the two halves' gradients, not their sum, nor one half's."""
    one, _ = run_train(photos, tmp_path / "one", "--steps", "1", "--lr", "1e-3", *flags)
    two, _ = run_train(photos, tmp_path / "two", "--steps", "1", "--lr", "1e-3", *flags, processes=2)
    losses = ["loss", "loss_instance", "loss_prior"]
    assert [logged(tmp_path / "two")[0][k] for k in losses] == \
        pytest.approx([logged(tmp_path / "one")[0][k] for k in losses], rel=1e-5, abs=1e-8)
    step, names, _ = in_process_step(photos, *flags)  # the optimizers' layout, to name their saved states
    params = [names[p] for optimizer in train_setup.torch_optimizers(step.optimizer)
              for p in optimizer.param_groups[0]["params"]]
    took = [10 * moments["exp_avg"] for saved in two["optimizers"] for moments in saved["state"].values()]
    expected = mean_of_halves(photos, flags)
    assert len(took) == len(params) == len(expected) > 10
    scale = max(g.abs().max() for g in expected.values())
    for name, gradient in zip(params, took):
        torch.testing.assert_close(gradient, expected[name], rtol=1e-4, atol=1e-6 * scale, msg=name)


def test_the_mean_of_the_halves_is_the_whole_batch(photos):
    """Eq. 2 over the whole batch is the mean of eq. 2 over equal halves: in float64, the gradients agree to 1e-10 of
    the largest (3e-12 measured). In float32 they differ by up to a few thousandths of it, as the UNet's kernels
    round a batch of 2 and a batch of 4 differently, and Adam's first step, g / |g|, turns a gradient that is all
    rounding (a bias that a GroupNorm follows) into a step of +-lr either way: so two processes and one agree to
    float rounding, not bit for bit."""
    step, names, seed = in_process_step(photos, "--no-step-in-backward", "--lr", "0")
    step.unet.double()
    step.contexts, step.alphas_cumprod = step.contexts.double(), step.alphas_cumprod.double()
    step.batches.posteriors = step.batches.posteriors.double()
    captured = []
    step.optimizer.step = lambda: captured.append({names[p]: p.grad.clone() for p in names})
    for share in [(0, 1), (0, 2), (1, 2)]:
        step.batches.share = share
        step.learn(*step.batches.draw(torch.Generator().manual_seed(seed)))
    whole, half, other_half = captured
    scale = max(g.abs().max() for g in whole.values())
    for name in whole:
        torch.testing.assert_close((half[name] + other_half[name]) / 2, whole[name], rtol=0, atol=1e-10 * scale)
    assert any(not torch.allclose(half[name], whole[name], atol=1e-3 * scale) for name in whole)


def test_ctrl_c_stops_the_group_at_one_step_saved_and_resume_continues(photos, tmp_path):
    """Ctrl-C reaches torchrun, which passes it on to each process: the two finish the same step, rank 0 saves it,
    and `--resume` under torchrun continues from there to the end, logging every step once."""
    out = tmp_path / "run"
    process = subprocess.Popen(command(photos, out, "--steps", "100000", "--save-every", "0", processes=2), cwd=ROOT,
                               env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not ((out / "log.jsonl").exists() and len(logged(out)) >= 3) and process.poll() is None:
        assert time.monotonic() < deadline, "no step logged in 300 s"
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode != 0
    saved = torch.load(out / "train_state.pt", weights_only=True)["step"]
    assert 3 <= saved < 100000 and logged(out)[-1]["step"] == saved, stderr[-3000:]
    assert stdout.count(f"saved step {saved}") == 1  # rank 0's line, once
    done = subprocess.run([*command(photos, out, processes=2)[:7], "train.py", "--resume", str(out), "--steps",
                           str(saved + 2)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [row["step"] for row in logged(out)] == list(range(1, saved + 3))


def test_a_diverging_loss_stops_every_process(photos, tmp_path):
    """At lr 1e8 the second step's loss is nan: the group stops there, the first step saved."""
    done = subprocess.run(command(photos, tmp_path / "run", "--steps", "10", "--save-every", "1", "--lr", "1e8",
                                  processes=2), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "loss is nan at step 2" in done.stderr
    assert torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)["step"] == 1


def test_the_batch_must_split_evenly(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        train_settings.parse_args(["--instance", "x", "--class", "dog", "--ckpt", "tiny", "--batch-size", "3"])
    assert e.value.code == 2
    assert "--batch-size 3: with 2 processes it must be a multiple of 2" in capsys.readouterr().err


def test_two_processes_train_concepts_and_rank_0_draws_the_previews(photos, tmp_path):
    """A concepts run under torchrun: the first step's losses are one process's, and rank 0 draws the preview grids,
    a row per concept."""
    concepts = two_concepts(photos, tmp_path)
    flags = ["--concepts", str(concepts), "--steps", "2", "--sample-every", "2", "--sample-steps", "2"]
    outs = {}
    for processes in (1, 2):
        outs[processes] = tmp_path / f"run{processes}"
        argv = [arg for arg in command(photos, outs[processes], processes=processes)
                if arg not in ("--sample-every", "0")]
        argv = argv[:argv.index("--instance")] + argv[argv.index("--ckpt"):] + flags
        done = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    losses = ["loss", "loss_instance", "loss_prior"]
    assert [logged(outs[2])[0][k] for k in losses] == pytest.approx([logged(outs[1])[0][k] for k in losses], rel=1e-5)
    with Image.open(outs[2] / "samples" / "step-00002.png") as grid:
        assert (grid.width, grid.height) == (5 * 64, 2 * 64)
