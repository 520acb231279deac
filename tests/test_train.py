"""train.py on the tiny model, on the CPU: eq. 2, learning, the files of a run, exact resume, the optimizer stepped
inside backward, Ctrl-C, a non-finite loss, and the messages for bad input."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import SafetensorError

import dreambooth
import train
import train_settings
import train_setup
from dreambooth import speed, toyworld
from dreambooth.ddim import add_noise
from dreambooth.images import load_images
from dreambooth.vae import LATENT_SCALE
from tests.conftest import run
from tests.fake_cuda import FakeCUDA

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # results compared bit for bit


def weights(out):
    return torch.load(out / "train_state.pt", weights_only=True)["weights"]["unet"]


def eq2_by_hand(photos, seed, batch_size, prior_weight, lr, prior_prompt, clip_grad=None, noise_offset=0.0):
    """One DreamBooth step written out, from the untouched tiny model: the draws in train.py's order from a CPU
    generator seeded `seed` (subject rows, prior rows, flips, z ~ q(z|x), t, noise, then with noise_offset one
    constant per channel), DDPM eq. 4, eq. 2, backward, and one step of torch's reference (unfused) AdamW.
    prior_prompt: the prompt of all 3 prior photos, or a list of each one's.
    Returns ([loss, instance, prior], the UNet after)."""
    sd = dreambooth.load("tiny")
    g = torch.Generator().manual_seed(seed)
    images, _ = load_images([p for folder in ("instance", "prior")
                             for p in sorted((photos / folder).glob("*.png"))], 64)  # 2 subject photos, then 3 prior
    idx = torch.cat([torch.randint(2, (batch_size,), generator=g), 2 + torch.randint(3, (batch_size,), generator=g)])
    flip = torch.randint(2, idx.shape, generator=g).bool().view(-1, 1, 1, 1)
    with torch.no_grad():
        mean, logvar = sd.vae.encode(torch.where(flip, images[idx].flip(-1), images[idx]))
    z = (mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=g)) * 0.18215  # SD's latent scale
    t = torch.randint(1000, idx.shape, generator=g)
    noise = torch.randn(z.shape, generator=g)
    if noise_offset:  # offset noise: each (sample, channel) gets one more random constant
        noise = noise + noise_offset * torch.randn(len(z), z.shape[1], 1, 1, generator=g)
    prior_prompts = prior_prompt if isinstance(prior_prompt, list) else [prior_prompt] * 3  # one for each, or all
    context = sd.encode_text(["photo of a sks dog"] * batch_size + [prior_prompts[i - 2] for i in idx[batch_size:]])
    a = sd.alphas_cumprod[t].view(-1, 1, 1, 1)
    eps = sd.unet(a.sqrt() * z + (1 - a).sqrt() * noise, t, context)  # DDPM eq. 4, then the noise prediction
    instance = (eps[:batch_size] - noise[:batch_size]).square().mean()
    prior = (eps[batch_size:] - noise[batch_size:]).square().mean()
    loss = instance + prior_weight * prior  # eq. 2
    loss.backward()
    if clip_grad:
        torch.nn.utils.clip_grad_norm_(sd.unet.parameters(), clip_grad)
    torch.optim.AdamW(sd.unet.parameters(), lr=lr, weight_decay=0.01).step()
    return [loss.item(), instance.item(), prior.item()], sd.unet


def make_step(photos, *flags):
    """train.py's own setup of the step on the tiny model, as main() makes it."""
    args, _ = train_settings.parse_args(["--instance", str(photos / "instance"), "--prior", str(photos / "prior"),
                                "--class", "dog", "--ckpt", "tiny", "--device", "cpu", "--resolution", "64", *flags])
    train_settings.resolve_defaults(args)
    concepts = train_settings.run_concepts(args)
    sd, images, photos = train_setup.load_model_and_photos(args, concepts, torch.device("cpu"))
    step, trained = train.make_step(sd, images, photos, args, torch.device("cpu"))
    return sd, step


def assert_same_unet(unet, reference):
    """The same weights within float rounding (fused and unfused AdamW round differently); an AdamW step at lr 1e-3
    moves each weight by about 1e-3."""
    start, ours, theirs = dreambooth.load("tiny").unet.state_dict(), unet.state_dict(), reference.state_dict()
    for name in start:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6, msg=name)
    assert sum(not torch.equal(ours[k], start[k]) for k in start) > len(start) // 2  # the step moved them


def test_step_is_eq2_then_adamw(photos):
    """The step as a call: draws from the generator it is given, eq. 2 on them, and the AdamW update."""
    sd, step = make_step(photos, "--batch-size", "2", "--prior-weight", "0.5", "--lr", "1e-3")
    losses = step(torch.Generator().manual_seed(7))
    expected, unet = eq2_by_hand(photos, 7, 2, 0.5, 1e-3, "a dog, from make_prior")
    assert losses.tolist() == pytest.approx(expected, rel=1e-5)
    assert_same_unet(sd.unet, unet)


def test_noise_offset_noises_each_channels_mean(photos):
    """--noise-offset adds a random constant to each channel's noise: the step is eq. 2 on that noise, and it trains
    differently from plain noise."""
    sd, step = make_step(photos, "--batch-size", "2", "--lr", "1e-3", "--noise-offset", "0.5")
    losses = step(torch.Generator().manual_seed(7))
    expected, unet = eq2_by_hand(photos, 7, 2, 1.0, 1e-3, "a dog, from make_prior", noise_offset=0.5)
    plain, _ = eq2_by_hand(photos, 7, 2, 1.0, 1e-3, "a dog, from make_prior")
    assert losses.tolist() == pytest.approx(expected, rel=1e-5)
    assert losses.tolist() != pytest.approx(plain, rel=1e-3)
    assert_same_unet(sd.unet, unet)


def test_each_prior_image_trains_with_its_own_prompt(photos, tmp_path):
    """A prior folder whose manifest.jsonl lists several prompts (make_prior.py --prompt A --prompt B): each image it
    lists trains with its own prompt, the one it does not list with --prior-prompt."""
    prior = shutil.copytree(photos / "prior", tmp_path / "prior")
    (prior / "manifest.jsonl").write_text("".join(json.dumps({"file": f, "prompt": p}) + "\n"
                                                  for f, p in [("00.png", "a dog"), ("01.png", "a red dog")]))
    sd, step = make_step(photos, "--batch-size", "3", "--lr", "1e-3", "--prior", str(prior), "--prior-prompt",
                         "a blue dog")
    losses = step(torch.Generator().manual_seed(7))
    expected, unet = eq2_by_hand(photos, 7, 3, 1.0, 1e-3, ["a dog", "a red dog", "a blue dog"])
    one_prompt, _ = eq2_by_hand(photos, 7, 3, 1.0, 1e-3, "a dog")
    assert losses.tolist() == pytest.approx(expected, rel=1e-5)
    assert losses[2].item() != pytest.approx(one_prompt[2], rel=1e-4)  # the draw took images of other prompts
    assert_same_unet(sd.unet, unet)


def test_prior_loss_base_trains_toward_the_frozen_base_model(photos):
    """--prior-loss base: each prior row comes twice, with its prompt and with the empty prompt, and the target of
    both is the base model's prediction. At the first step the UNet is the base, so the prior loss is 0 while the
    subject's half is eq. 2 as the paper's step computes it; the base stays as it was while the UNet moves, so at the
    next step the prior loss is not 0."""
    sd, step = make_step(photos, "--batch-size", "2", "--lr", "1e-3", "--prior-loss", "base")
    losses = step(torch.Generator().manual_seed(7))
    paper, _ = eq2_by_hand(photos, 7, 2, 1.0, 1e-3, "a dog, from make_prior")
    assert losses[1].item() == pytest.approx(paper[1], rel=1e-5)
    assert losses[2].item() < 1e-10
    start = dreambooth.load("tiny").unet.state_dict()
    assert all(torch.equal(w, start[k]) for k, w in step.base_unet.state_dict().items())
    assert not torch.equal(sd.unet.state_dict()["out.2.weight"], start["out.2.weight"])
    assert step(torch.Generator().manual_seed(8))[2].item() > 1e-6


def test_base_prior_targets_add_the_empty_prompt_and_the_base_prediction():
    """What base_prior_targets hands eq. 2: the prior rows' x_t and t again, with the empty prompt's row, and as the
    prior rows' target the base UNet's prediction for exactly those rows (the subject's rows keep their noise)."""
    seen = {}

    def base_unet(x, t, context):
        seen.update(x=x, t=t, context=context)
        return x * 10 + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)

    g = torch.Generator().manual_seed(0)
    x_t, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t, rows = torch.tensor([5, 50, 500]), torch.tensor([0, 1, 2])
    contexts = torch.arange(4.0).view(4, 1, 1).expand(4, 77, 8)  # row k's context is all k; row 3: ""
    x2, t2, rows2, target = train.base_prior_targets(base_unet, contexts, x_t, t, rows, noise, 1, uncond_row=3)
    assert torch.equal(x2, torch.cat([x_t, x_t[1:]])) and t2.tolist() == [5, 50, 500, 50, 500]
    assert rows2.tolist() == [0, 1, 2, 3, 3]
    assert torch.equal(seen["x"], x2[1:]) and seen["context"][:, 0, 0].tolist() == [1, 2, 3, 3]
    assert torch.equal(target[:1], noise[:1])
    assert torch.equal(target[1:], x2[1:] * 10 + torch.tensor([1.0, 2, 3, 3]).view(-1, 1, 1, 1))


def test_prior_loss_base_with_lora_uses_the_model_without_its_adapters(photos):
    """With --lora the base is the UNet itself with its adapters off: no copy. After steps that move the adapters, it
    still predicts what the untouched model predicts, while the UNet with its adapters does not."""
    sd, step = make_step(photos, "--lora", "4", "--lr", "1e-2", "--prior-loss", "base")
    assert step(torch.Generator().manual_seed(7))[2].item() < 1e-10  # up = 0: the adapted UNet is the base
    for seed in range(3):
        step(torch.Generator().manual_seed(seed))
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([400])
    context = sd.encode_text(["a dog"])
    with torch.no_grad():
        untouched = dreambooth.load("tiny").unet(x, t, context)
        torch.testing.assert_close(step.base_unet(x, t, context), untouched)
        assert not torch.allclose(sd.unet(x, t, context), untouched, atol=1e-6)


def test_clip_grad_clips(photos):
    """--clip-grad 1e-6 scales the gradient down until AdamW's eps dominates its update: the weights move far less
    than unclipped, exactly as clipping by hand makes them move."""
    sd, step = make_step(photos, "--lr", "1e-3", "--clip-grad", "1e-6")
    step(torch.Generator().manual_seed(7))
    _, clipped = eq2_by_hand(photos, 7, 1, 1.0, 1e-3, "a dog, from make_prior", clip_grad=1e-6)
    _, unclipped = eq2_by_hand(photos, 7, 1, 1.0, 1e-3, "a dog, from make_prior")
    assert_same_unet(sd.unet, clipped)
    start = dreambooth.load("tiny").unet.state_dict()
    moved = {name: sum((m.state_dict()[k] - start[k]).abs().sum().item() for k in start)
             for name, m in (("clipped", sd.unet), ("unclipped", unclipped))}
    assert moved["clipped"] < 0.5 * moved["unclipped"]


def test_train_py_logs_eq2_and_saves_its_step(photos, tmp_path):
    """main() end to end: its run generator (--seed 42), the prior prompt from the prior folder's manifest, the
    logged losses and the saved weights are those of the step written out by hand."""
    run(photos, tmp_path / "run", "--steps", "1", "--prior-weight", "0.5", "--lr", "1e-3")
    expected, unet = eq2_by_hand(photos, 42, 1, 0.5, 1e-3, "a dog, from make_prior")
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert record["step"] == 1
    assert [record["loss"], record["loss_instance"], record["loss_prior"]] == pytest.approx(expected, rel=1e-5)
    saved = dreambooth.load("tiny").unet
    saved.load_state_dict(weights(tmp_path / "run"))
    assert_same_unet(saved, unet)


def test_short_run_learns_and_writes_a_usable_run(photos, tmp_path, capsys):
    """Overfit one photo: the loss on a fixed batch (latent, noise, timesteps) drops. Then the run's files."""
    out = tmp_path / "run"
    run(photos, out, "--steps", "30", "--lr", "1e-3", "--sample-every", "30", "--sample-steps", "2",
        instance="one", prior=None)
    assert "prior preservation" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [".lock", "log.jsonl", "model.safetensors", "samples",
                                                     "train_state.pt"]
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [10, 20, 30]
    grid = Image.open(out / "samples" / "step-00030.png")
    assert grid.size == (5 * 64, 64)  # instance prompt, three edits, prior prompt

    before, after = dreambooth.load("tiny"), dreambooth.load(out / "model.safetensors")
    with torch.no_grad():
        mean, _ = before.vae.encode(load_images([photos / "one" / "00.png"], 64)[0])
        latents = (mean * LATENT_SCALE).expand(4, -1, -1, -1)
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([50, 300, 600, 900])
        x_t = add_noise(latents, noise, t, before.alphas_cumprod)
        losses = [train.dreambooth_loss(sd.unet, x_t, t, sd.encode_text(["photo of a sks dog"]).expand(4, -1, -1),
                                        noise, 4, 1.0)[0] for sd in (before, after)]
    assert losses[1] < 0.8 * losses[0]


def test_previews_decode_with_vae_and_name_the_run(photos, tmp_path):
    from safetensors.torch import save_file

    vae = {k: v.contiguous() for k, v in dreambooth.load("tiny").vae.state_dict().items()}
    save_file(vae, tmp_path / "ft-mse.safetensors")
    run(photos, tmp_path / "dog-run", "--steps", "1", "--sample-every", "1", "--sample-steps", "2", "--vae",
        str(tmp_path / "ft-mse.safetensors"))
    with Image.open(tmp_path / "dog-run" / "samples" / "step-00001.png") as grid:
        assert grid.text["parameters"].endswith("Model: dog-run, VAE: ft-mse.safetensors")


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
    pytest.importorskip("diffusers")
    from tests.references import single_file_pipeline

    out = tmp_path / "run"
    run(photos, out, "--steps", "2", "--lr", "1e-3")
    sd = dreambooth.load(out / "model.safetensors")
    pipe = single_file_pipeline(out / "model.safetensors", sd, tmp_path / "config")
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, sd.unet.config.context_dim)
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


def test_resume_with_prior_loss_base_keeps_the_base_of_the_run(photos, tmp_path):
    """--prior-loss base resumed: the frozen base is the --ckpt model, not the weights the run had reached, so 3 + 3
    steps give the weights of 6 straight."""
    flags = ["--lr", "1e-3", "--batch-size", "2", "--prior-loss", "base"]
    run(photos, tmp_path / "straight", "--steps", "6", *flags)
    run(photos, tmp_path / "run", "--steps", "3", *flags)
    train.main(["--resume", str(tmp_path / "run"), "--steps", "6"])
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "run")
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


@pytest.mark.parametrize("flags", [["--no-step-in-backward"], ["--no-cache"], ["--grad-checkpointing"]],
                         ids=["plain-loop", "no-cache", "grad-checkpointing"])
def test_same_weights_as_the_default(photos, straight, tmp_path, flags):
    """Stepping AdamW inside backward gives the weights of the plain loop; encoding every step gives those of the
    cached posteriors; recomputing activations in backward changes nothing."""
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


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_saves_the_step_and_exits(photos, tmp_path, signum, status):
    """Ctrl-C (or SIGTERM: kill, Slurm's time limit) in the middle of a long run: the step in progress finishes, is
    saved, and the --resume command shown; the exit status is the one shells give the signal (128 + its number)."""
    out = tmp_path / "run"
    command = [sys.executable, "train.py", "--instance", str(photos / "instance"), "--prior", str(photos / "prior"),
               "--class", "dog", "--ckpt", "tiny", "--steps", "100000", "--log-every", "1", "--save-every", "0",
               "--sample-every", "0", "--out", str(out)]
    process = subprocess.Popen(command, cwd=ROOT, env=os.environ | {"OMP_NUM_THREADS": "1"}, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = out / "log.jsonl"
    deadline = time.monotonic() + 300
    while not (log.exists() and len(log.read_text().splitlines()) >= 3) and process.poll() is None:
        assert time.monotonic() < deadline, "train.py logged no step in 300 s"
        time.sleep(0.1)
    process.send_signal(signum)
    if signum == signal.SIGTERM:  # Slurm and torchrun may both pass it on: a second one only asks again
        time.sleep(0.2)
        process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == status, stderr[-3000:]
    saved = torch.load(out / "train_state.pt", weights_only=True)["step"]
    assert 3 <= saved < 100000 and json.loads(log.read_text().splitlines()[-1])["step"] == saved
    assert f"saved step {saved}" in stdout and "--resume" in stdout


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(photos, tmp_path):
    """At lr 1e8 the first step throws the weights far out and the second step's loss is nan."""
    with pytest.raises(SystemExit, match=r"loss is nan at step 2; .*\(step 1\)"):
        run(photos, tmp_path / "run", "--steps", "10", "--save-every", "1", "--log-every", "1", "--lr", "1e8")
    state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)
    assert state["step"] == 1 and all(w.isfinite().all() for w in state["weights"]["unet"].values())


def test_after_a_crash_the_resumed_log_reads_as_one_run(photos, tmp_path):
    """Killed between saves, then resumed: one row per step, the rows written after the last save are not
    repeated, and the time column is the run's training time, growing across the crash."""
    out, log = tmp_path / "run", tmp_path / "run" / "log.jsonl"
    command = [sys.executable, "train.py", "--instance", str(photos / "instance"), "--prior", str(photos / "prior"),
               "--class", "dog", "--ckpt", "tiny", "--steps", "100000", "--log-every", "1", "--save-every", "3",
               "--sample-every", "0", "--out", str(out)]
    process = subprocess.Popen(command, cwd=ROOT, env=os.environ | {"OMP_NUM_THREADS": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (log.exists() and len(log.read_text().splitlines()) >= 8) and process.poll() is None:
        assert time.monotonic() < deadline, "train.py logged no step in 300 s"
        time.sleep(0.05)
    process.kill()
    process.wait()
    saved = torch.load(out / "train_state.pt", weights_only=True)["step"]
    train.main(["--resume", str(out), "--steps", str(saved + 4)])
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, saved + 5))
    assert [row["time"] for row in rows] == sorted(row["time"] for row in rows)


def test_resume_drops_a_log_row_cut_short(photos, tmp_path):
    out = tmp_path / "run"
    run(photos, out, "--steps", "2", "--log-every", "1")
    with open(out / "log.jsonl", "a") as log:
        log.write('{"step": 3, "lo')  # the machine died while this row was written
    train.main(["--resume", str(out), "--steps", "3"])
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_failed_log_or_preview_write_is_one_line(photos, tmp_path):
    out = tmp_path / "run"
    run(photos, out, "--steps", "1")
    (out / "samples").write_text("a file where the previews' folder goes")
    with pytest.raises(SystemExit, match=r"writing in .*run failed at step 2 \(File exists\); stopped, the last "
                                         r"good save \(step 1\)"):
        train.main(["--resume", str(out), "--steps", "2", "--sample-every", "1", "--sample-steps", "2"])


def test_a_full_disk_is_one_line_and_keeps_the_last_save(photos, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run(photos, out, "--steps", "2", "--save-every", "1")
    before = (out / "model.safetensors").read_bytes()

    def disk_full(tensors, path, metadata=None):  # what safetensors does when the disk fills up while it writes
        Path(path).write_bytes(b"\0" * 1000)
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space'
                              ' left on device" })')

    monkeypatch.setattr(dreambooth.checkpoint, "save_file", disk_full)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**10, 10**10 - 10**6, 10**6))
    with pytest.raises(SystemExit, match=r"saving step 3 failed: 1 MB free in .*run, and it needs about \d+ MB; "
                                         r"stopped, the last good save \(step 2\) is in .*run$"):
        train.main(["--resume", str(out), "--steps", "3"])
    assert (out / "model.safetensors").read_bytes() == before
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 2
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_why_the_step_runs_eagerly(photos, tmp_path, capsys):
    """On CUDA the step is one CUDA graph unless a setting needs the host inside the step; each reason is a line."""
    def why(*flags):
        args, _ = train_settings.parse_args(["--instance", "x", "--class", "dog", *flags])
        return train_setup.why_no_cuda_graph(args, torch.device("cuda"))

    assert why("--precision", "bf16") is None and why("--precision", "fp32", "--no-cache") is None
    assert "fp16" in why("--precision", "fp16")
    assert "--clip-grad" in why("--clip-grad", "1")
    assert "--no-cuda-graph" in why("--no-cuda-graph")
    run(photos, tmp_path / "run", "--steps", "1")
    printed = capsys.readouterr().out
    assert "step: eager (CUDA graphs need a CUDA device)" in printed
    assert "gradient checkpointing off: memory is not the limit on a CPU" in printed


def test_a_failed_recording_goes_on_eagerly(photos, monkeypatch, capsys):
    """If recording the CUDA graph fails (here on the CPU, through tests/fake_cuda.py: torch.cuda.graph raises at
    once, as an operation that a capture forbids would), the run goes on eagerly from the same step and trains
    exactly as an eager run (test_speed.py: what the failure leaves behind)."""
    monkeypatch.setattr(speed, "recording_failed_before", None)
    cuda = FakeCUDA(monkeypatch)
    cuda.fail = "operation not permitted when stream is capturing"
    sd_graph, graphed = make_step(photos, "--lr", "1e-3")
    graphed.learn = speed.CUDAGraphReplay(graphed.learn, 0, graphed.recording_failed)  # what --cuda-graph makes on CUDA
    sd_eager, eager = make_step(photos, "--lr", "1e-3")
    g_graph, g_eager = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(3):
        assert torch.equal(graphed(g_graph), eager(g_eager))
    assert "recording the CUDA graph failed (operation not permitted" in capsys.readouterr().out
    assert cuda.current is cuda.default and graphed.learn.graph is None  # the failed recording is let go
    assert all(torch.equal(a, b) for a, b in zip(sd_graph.unet.parameters(), sd_eager.unet.parameters()))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the CUDA graph step")


def mean_difference(a, b):
    return sum((a[k].cpu().float() - b[k].cpu().float()).abs().sum().item() for k in a) / sum(a[k].numel() for k in a)


@needs_cuda
@pytest.mark.parametrize("checkpointing", ["--grad-checkpointing", "--no-grad-checkpointing"])
def test_cuda_graph_trains_as_eager(photos, tmp_path, checkpointing, capsys):
    """The replayed graph draws what eager draws and moves the weights as eager does, and resuming it does too.
    Bit for bit where the same kernels run in the same order; cuDNN's and attention's backward kernels may
    accumulate in another order, and AdamW's step of a weight with a gradient near 0 magnifies that, so the
    measure is the mean difference against how far the weights moved (a stale input or a missed update moves
    them elsewhere altogether)."""
    flags = ["--steps", "8", "--lr", "1e-3", "--batch-size", "2", "--device", "cuda", "--precision", "bf16",
             checkpointing]
    run(photos, tmp_path / "eager", *flags, "--no-cuda-graph")
    run(photos, tmp_path / "graph", *flags)
    run(photos, tmp_path / "resumed", "--steps", "4", *flags[2:])
    train.main(["--resume", str(tmp_path / "resumed"), "--steps", "8"])
    printed = capsys.readouterr().out
    assert "one CUDA graph" in printed and "recording the CUDA graph failed" not in printed
    start = dreambooth.load("tiny").unet.state_dict()
    eager, graph, resumed = (weights(tmp_path / name) for name in ("eager", "graph", "resumed"))
    moved, differ = mean_difference(eager, start), mean_difference(graph, eager)
    print(f"graph vs eager after 8 steps: mean |difference| {differ:.3g} (weights moved {moved:.3g}), largest "
          f"{max((eager[k] - graph[k]).abs().max().item() for k in eager):.3g}, identical: "
          f"{all(torch.equal(eager[k], graph[k]) for k in eager)}")
    assert differ < 0.01 * moved
    assert mean_difference(resumed, graph) < 0.01 * moved


def test_bad_inputs_are_named(photos, tmp_path, capsys):
    with pytest.raises(SystemExit, match="missing: no such folder"):
        run(photos, tmp_path / "a", instance="missing")
    with pytest.raises(SystemExit, match=r"00\.png: is a file; give the folder of photos \(.*instance\)"):
        run(photos, tmp_path / "a", instance="instance/00.png")
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
    assert "argument --resolution: 30: must be a multiple of 8, at least 64" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # refused before training, not at the first preview
        run(photos, tmp_path / "f", "--sample-steps", "1000")
    assert "argument --sample-steps: 1000: must be from 1 to 999" in capsys.readouterr().err



def test_toy_previews_say_how_they_were_drawn_and_ask_what_the_toy_knows(photos, tmp_path, capsys):
    """The toy's preview grids are drawn at its file's guidance scale (3, not SD's 7.5), and their PNG info says so;
    their prompts, and the closing hint's, use only words the toy's captions know (SD's previews put the subject
    in the snow and on the beach)."""
    out = tmp_path / "run"
    train.main(["--instance", str(photos / "instance"), "--prior", str(photos / "prior"), "--class", "circle",
                "--ckpt", "toy", "--device", "cpu", "--steps", "1", "--sample-every", "1", "--sample-steps", "2",
                "--out", str(out)])
    with Image.open(out / "samples" / "step-00001.png") as grid:
        assert grid.text["parameters"] == ("a sks circle\nSteps: 2, Sampler: DDIM, CFG scale: 3.0, Seed: 42, "
                                           "Size: 64x64, Model: run")
    assert f'sample.py --ckpt {out / "model.safetensors"} --prompt "a sks circle"' in capsys.readouterr().out
    prompts = {}
    for ckpt in ("toy", "tiny"):
        args, _ = train_settings.parse_args(["--instance", "x", "--class", "circle", "--ckpt", ckpt])
        train_settings.resolve_defaults(args)
        prompts[ckpt] = train_setup.preview_prompts(args, train_settings.run_concepts(args)[0])
    known = {"a", "sks", *toyworld.SHAPES, *toyworld.COLOURS}
    assert all(set(prompt.split()) <= known for prompt in prompts["toy"]), prompts["toy"]
    assert prompts["tiny"][1] == "a sks circle in the snow"  # SD's edits
