"""The session's full-size SD v1 checkpoint files with random weights, and what the independent implementations
(diffusers, transformers; built in tests/references.py) compute from those weights.

Built once per session. The weights are seeded random values in the shapes of our models, in fp16 (half the disk
and time; the fp32 references hold the very same values), under the original CompVis key names, written as
  (a) a PyTorch Lightning style .ckpt like sd-v1-4.ckpt (state_dict, global_step, epoch and a `callbacks` entry
      keyed by a class from a fake `pytorch_lightning` module, removed again before anything is loaded), and
  (b) a .safetensors.
The key layout is proven to be the real one by diffusers' own LDM -> diffusers converters (the code diffusers runs
on sd-v1-4 files) followed by strict loads into diffusers' UNet2DConditionModel and AutoencoderKL and transformers'
CLIPTextModel: no key table of ours is involved.
"""
import json
import signal
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import train

from dreambooth.checkpoint import CLIP, UNET, VAE
from dreambooth.clip import CLIPConfig, CLIPTextModel
from dreambooth.unet import UNetConfig, UNetModel
from dreambooth.vae import AutoencoderKL, VAEConfig
from tests.references import (compvis_schedule, parity_inputs, random_model, reference_clip, reference_unet,
                              reference_vae, write_lightning_ckpt)

# Importing the programs imported startup.py, whose Ctrl-C handler ends a program at once: pytest keeps Python's, so
# that Ctrl-C stops a test run with its summary.
signal.signal(signal.SIGINT, signal.default_int_handler)


# Tests too slow for the quick subset (`python -m pytest -m quick`, about 80 s on 2 cores): besides those that
# build full-size SD v1 models (the sd_v1_files fixture, or test_full_size_* themselves), these train the toy model,
# run the benchmarks or make_toy.py, or run the programs as processes (torchrun's among them) for several seconds.
SLOW = ("test_benchmarks.py", "test_dreambooth_teaches_the_toy_model_its_subject", "test_the_prior_keeps_the_class",
        "test_concepts_teach_two_subjects", "test_torchrun.py::test_two_processes", "test_torchrun.py::test_ctrl_c",
        "test_torchrun.py::test_a_diverging",
        "test_make_toy.py::test_a_run", "test_make_toy.py::test_vae_from_keeps", "test_a_run_folder_is_one_runs",
        "test_two_fresh_runs_started", "test_run_opens_in_sample_py", "test_after_a_crash_the_resumed_log",
        "test_ctrl_c_saves_the_step", "test_ctrl_c_while_importing", "test_help_shows_defaults", "test_command_line_",
        "test_compressed_zip_members_are_refused_before_reading", "test_training_writes_a_lora_diffusers_loads",
        "test_ema_weights_follow_diffusers_naming", "test_the_toy_vae_gives_back", "test_clip.py::test_keys_are",
        "test_torchrun_")


def pytest_collection_modifyitems(items):
    """Every test that is not slow is marked quick."""
    for item in items:
        slow = "sd_v1_files" in item.fixturenames or "full_size" in item.name or any(s in item.nodeid for s in SLOW)
        if not slow:
            item.add_marker(pytest.mark.quick)


@torch.no_grad()
def random_sd_v1(inputs: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Full-size fp16 random weights under CompVis key names, and the fp32 references' outputs on `inputs`."""
    unet = random_model(UNetModel, UNetConfig(), seed=0, dtype=torch.float16).eval()
    vae = random_model(AutoencoderKL, VAEConfig(), seed=1, dtype=torch.float16).eval()
    text_encoder = random_model(CLIPTextModel, CLIPConfig(), seed=2, dtype=torch.float16).eval()
    expected = dict(eps=reference_unet(unet).float()(inputs["x"], inputs["t"], inputs["context"]).sample)
    ref = reference_vae(vae).float()
    posterior = ref.encode(inputs["image"]).latent_dist
    expected.update(mean=posterior.mean, logvar=posterior.logvar, decoded=ref.decode(inputs["z"]).sample)
    expected["context"] = reference_clip(text_encoder).float()(inputs["ids"]).last_hidden_state
    weights = {prefix + k: v for prefix, model in ((UNET, unet), (VAE, vae), (CLIP, text_encoder))
               for k, v in model.state_dict().items()}
    return weights, expected


@pytest.fixture(scope="session")
def sd_v1_files(tmp_path_factory):
    """Full-size SD v1 files (.ckpt and .safetensors, fp16 random weights) and the reference outputs.

    Yields a namespace: ckpt, safetensors (paths), inputs and expected (dicts of tensors)."""
    pytest.importorskip("diffusers")
    inputs = parity_inputs(UNetConfig(), CLIPConfig())
    weights, expected = random_sd_v1(inputs)

    folder = tmp_path_factory.mktemp("sd_v1")
    files = SimpleNamespace(ckpt=folder / "sd-v1-random.ckpt", safetensors=folder / "sd-v1-random.safetensors",
                            inputs=inputs, expected=expected)
    weights.update(compvis_schedule())
    save_file(weights, files.safetensors)
    # What else sd-v1-4.ckpt carries: LitEma's bookkeeping and transformers' position_ids buffer.
    weights.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(470000),
                    CLIP + "embeddings.position_ids": torch.arange(77)[None]})
    write_lightning_ckpt(weights, files.ckpt)
    del weights
    yield files
    files.ckpt.unlink()  # 4 GB of disk: do not leave it to pytest's basetemp rotation
    files.safetensors.unlink()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the tests that compare results bit for bit: with several threads on a busy machine,
    the order of some floating-point sums changes from run to run (README, "When results are identical"). The tiny
    model gains nothing from a second thread anyway. Subprocesses get OMP_NUM_THREADS=1 for the same reason."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- training the tiny model (test_train.py, test_lora.py) ----------------------------------------------------

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
