"""train.py on the tiny model, on the CPU: eq. 2, learning, the files of a run, exact resume, the optimizer stepped
inside backward, Ctrl-C, a non-finite loss, and the messages for bad input."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import dreambooth
import train
from dreambooth.images import load_image
from dreambooth.vae import LATENT_SCALE

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from a second thread, and on a busy machine two threads crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Folders of small random photos (80x72, cropped to 64 px): instance/ 2, prior/ 3 (with the manifest.jsonl
    of make_prior.py), one/ 1, few_prior/ 1."""
    root = tmp_path_factory.mktemp("photos")
    gen = torch.Generator().manual_seed(0)
    for folder, n in (("instance", 2), ("prior", 3), ("one", 1), ("few_prior", 1)):
        (root / folder).mkdir()
        for k in range(n):
            pixels = (torch.rand(80, 72, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / folder / f"{k:02d}.png")
    (root / "prior" / "manifest.jsonl").write_text(json.dumps({"file": "00.png", "prompt": "a dog, from make_prior"}))
    return root


def run(photos, out, *flags, instance="instance", prior="prior"):
    """train.main on the tiny model at 64 px without preview grids, unless the flags say otherwise."""
    argv = ["--instance", str(photos / instance), "--class", "dog", "--ckpt", "tiny", "--device", "cpu",
            "--resolution", "64", "--out", str(out), "--sample-every", "0", *flags]
    train.main(argv + (["--prior", str(photos / prior)] if prior else []))


def weights(out):
    return torch.load(out / "train_state.pt", weights_only=True)["weights"]["unet"]


def test_one_step_is_eq2_by_hand(photos, tmp_path, monkeypatch):
    """The logged loss of a step is DreamBooth eq. 2, computed here from the step's own latents, noise and t;
    the first row is the subject with the instance prompt, the second a prior image with the prompt of the prior
    folder's manifest."""
    seen = []

    def recording_loss(unet, latents, context, noise, t, alphas_cumprod, n_instance, prior_weight):
        with torch.no_grad():  # before backward, which updates the weights
            a = alphas_cumprod[t].view(-1, 1, 1, 1)
            eps = unet(a.sqrt() * latents + (1 - a).sqrt() * noise, t, context)  # DDPM eq. 4
            parts = F.mse_loss(eps[:1], noise[:1]), F.mse_loss(eps[1:], noise[1:])
        seen.append(dict(parts=parts, context=context.clone(), n_instance=n_instance, prior_weight=prior_weight))
        return dreambooth_loss(unet, latents, context, noise, t, alphas_cumprod, n_instance, prior_weight)

    dreambooth_loss = train.dreambooth_loss
    monkeypatch.setattr(train, "dreambooth_loss", recording_loss)
    run(photos, tmp_path / "run", "--steps", "1", "--prior-weight", "0.5", "--lr", "1e-3")

    (call,) = seen
    assert (call["n_instance"], call["prior_weight"]) == (1, 0.5)
    sd = dreambooth.load("tiny")
    expected_context = sd.encode_text(["photo of a sks dog", "a dog, from make_prior"])
    torch.testing.assert_close(call["context"], expected_context)
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    instance, prior = (p.item() for p in call["parts"])
    assert record["step"] == 1
    assert record["loss_instance"] == pytest.approx(instance, rel=1e-5)
    assert record["loss_prior"] == pytest.approx(prior, rel=1e-5)
    assert record["loss"] == pytest.approx(instance + 0.5 * prior, rel=1e-5)


def test_short_run_learns_and_writes_a_usable_run(photos, tmp_path, capsys):
    """Overfit one photo: the loss on a fixed batch (latent, noise, timesteps) drops. Then the run's files."""
    out = tmp_path / "run"
    run(photos, out, "--steps", "30", "--lr", "1e-3", "--sample-every", "30", "--sample-steps", "2",
        instance="one", prior=None)
    assert "prior preservation" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["log.jsonl", "model.safetensors", "samples", "train_state.pt"]
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [10, 20, 30]
    grid = Image.open(out / "samples" / "step-00030.png")
    assert grid.size == (5 * 64, 64)  # instance prompt, three edits, prior prompt

    before, after = dreambooth.load("tiny"), dreambooth.load(out / "model.safetensors")
    with torch.no_grad():
        mean, _ = before.vae.encode(load_image(photos / "one" / "00.png", 64)[None])
        latents = (mean * LATENT_SCALE).expand(4, -1, -1, -1)
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([50, 300, 600, 900])
        losses = [train.dreambooth_loss(sd.unet, latents, sd.encode_text(["photo of a sks dog"]).expand(4, -1, -1),
                                        noise, t, sd.alphas_cumprod, 4, 1.0)[0] for sd in (before, after)]
    assert losses[1] < 0.8 * losses[0]


def test_run_opens_in_sample_py(photos, tmp_path):
    """The subprocess test: train.py as a command, then sample.py loads the model it wrote."""
    out = tmp_path / "run"
    command = [sys.executable, "train.py", "--instance", str(photos / "instance"), "--prior", str(photos / "prior"),
               "--class", "dog", "--ckpt", "tiny", "--steps", "2", "--sample-every", "0", "--out", str(out)]
    sample = [sys.executable, "sample.py", "--ckpt", str(out / "model.safetensors"), "--prompt", "a sks dog",
              "--ddim_steps", "2", "--outdir", str(tmp_path / "samples"), "--skip_grid"]
    for argv in (command, sample):
        result = subprocess.run(argv, cwd=ROOT, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True,
                                text=True)
        assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(tmp_path / "samples" / "00000.png").size == (64, 64)


def test_saved_model_opens_in_diffusers(photos, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from tests.conftest import write_diffusers_config

    out = tmp_path / "run"
    run(photos, out, "--steps", "2", "--lr", "1e-3")
    sd = dreambooth.load(out / "model.safetensors")
    write_diffusers_config(tmp_path / "config", sd)
    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        str(out / "model.safetensors"), config=str(tmp_path / "config"), local_files_only=True,
        safety_checker=None, feature_extractor=None, tokenizer=None, torch_dtype=torch.float32)
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(sd.unet(x, t, context), pipe.unet(x, t, encoder_hidden_states=context).sample,
                                   rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def straight(photos, tmp_path_factory):
    """10 steps in one go, with warm-up and a batch of 2 + 2: the reference for resume and the optimizer modes."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run(photos, out, "--steps", "10", "--lr", "1e-3", "--warmup-steps", "3", "--batch-size", "2")
    return weights(out)


def test_resume_is_exact(photos, straight, tmp_path):
    out = tmp_path / "run"
    run(photos, out, "--steps", "5", "--lr", "1e-3", "--warmup-steps", "3", "--batch-size", "2")
    train.main(["--resume", str(out), "--steps", "10"])
    resumed = weights(out)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [5, 10]


@pytest.mark.parametrize("flags", [["--no-step-in-backward"], ["--no-step-in-backward", "--clip-grad", "1e6"],
                                   ["--no-cache"], ["--grad-checkpointing"]],
                         ids=["plain-loop", "clip-grad", "no-cache", "grad-checkpointing"])
def test_same_weights_as_the_default(photos, straight, tmp_path, flags):
    """Stepping AdamW inside backward gives the weights of the plain loop (clipping at a norm never reached
    changes nothing); encoding every step gives those of the cached posteriors; recomputing activations in
    backward changes nothing."""
    out = tmp_path / "run"
    run(photos, out, "--steps", "10", "--lr", "1e-3", "--warmup-steps", "3", "--batch-size", "2", *flags)
    other = weights(out)
    assert all(torch.equal(other[k], straight[k]) for k in straight)
    start = dreambooth.load("tiny").unet.state_dict()
    assert not all(torch.equal(straight[k], start[k]) for k in straight)


def test_text_encoder_training_in_bf16(photos, tmp_path):
    out = tmp_path / "run"
    run(photos, out, "--steps", "2", "--lr", "1e-3", "--train-text-encoder", "--precision", "bf16")
    trained = torch.load(out / "train_state.pt", weights_only=True)["weights"]["text_encoder"]
    start = dreambooth.load("tiny").text_encoder.state_dict()
    assert trained.keys() == start.keys()
    assert not torch.equal(trained["encoder.layers.0.mlp.fc1.weight"], start["encoder.layers.0.mlp.fc1.weight"])


def test_ctrl_c_saves_the_step_and_exits(photos, tmp_path, monkeypatch, capsys):
    calls = []

    def interrupted_loss(*args):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return dreambooth_loss(*args)

    dreambooth_loss = train.dreambooth_loss
    monkeypatch.setattr(train, "dreambooth_loss", interrupted_loss)
    handler = signal.getsignal(signal.SIGINT)
    run(photos, tmp_path / "run", "--steps", "10")
    assert len(calls) == 3 and torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)["step"] == 3
    assert "--resume" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is handler


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(photos, tmp_path, monkeypatch):
    calls = []

    def exploding_loss(*args):
        calls.append(1)
        loss, loss_instance, loss_prior = dreambooth_loss(*args)
        return (loss * float("nan") if len(calls) == 4 else loss), loss_instance, loss_prior

    dreambooth_loss = train.dreambooth_loss
    monkeypatch.setattr(train, "dreambooth_loss", exploding_loss)
    with pytest.raises(SystemExit, match=r"loss is nan at step 4; .*\(step 3\)"):
        run(photos, tmp_path / "run", "--steps", "10", "--save-every", "3")
    state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)
    assert state["step"] == 3 and all(w.isfinite().all() for w in state["weights"]["unet"].values())


def test_bad_inputs_are_named(photos, tmp_path, capsys):
    with pytest.raises(SystemExit, match="missing: no such folder"):
        run(photos, tmp_path / "a", instance="missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="empty: no images"):
        run(tmp_path, tmp_path / "b", instance="empty", prior=None)
    with pytest.raises(SystemExit, match="python make_prior.py --class dog --outdir .*few_prior"):
        run(photos, tmp_path / "c", prior="few_prior")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(SystemExit, match=r"bad\.jpg: cannot read"):
        run(tmp_path, tmp_path / "d", instance="broken", prior=None)

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="--out .*taken exists"):
        run(photos, tmp_path / "taken")
    assert os.listdir(tmp_path / "taken") == ["notes.txt"]
    assert (tmp_path / "taken" / "notes.txt").read_text() == "keep me"

    with pytest.raises(SystemExit):
        train.main(["--resume", str(tmp_path / "taken")])
    assert "no train_state.pt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(photos, tmp_path / "e", "--resolution", "30")
    assert "--resolution 30: must be a positive multiple of 8" in capsys.readouterr().err

