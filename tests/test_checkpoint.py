"""dreambooth.load / save: full-size parity from both file formats, safe unpickling, the checks
and their messages, EMA, round trips, and files that diffusers' single-file loader opens."""
import os
import re
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dreambooth
from dreambooth.checkpoint import CLIP, UNET, VAE, CheckpointError
from dreambooth.unet import UNetConfig
from dreambooth.vae import AutoencoderKL
from tests.references import (assert_close, compvis_schedule, diffusers_unet_config, parity_inputs, random_model,
                              single_file_pipeline, write_lightning_ckpt)


# ---- full size: both formats against diffusers / transformers --------------------------------

@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
@torch.no_grad()
def test_full_size_file_matches_references(sd_v1_files, fmt):
    sd = dreambooth.load(getattr(sd_v1_files, fmt))
    inputs, expected = sd_v1_files.inputs, sd_v1_files.expected
    assert "pytorch_lightning" not in sys.modules
    assert sd.resolution == 512 and sd.unet.config == UNetConfig()
    assert torch.equal(sd.alphas_cumprod, compvis_schedule()["alphas_cumprod"])
    assert all(p.dtype == torch.float32 for p in sd.unet.parameters())
    assert expected["eps"].abs().max() > 1e-2 and expected["decoded"].abs().max() > 1e-2  # not degenerate

    assert_close(sd.unet(inputs["x"], inputs["t"], inputs["context"]), expected["eps"])
    mean, logvar = sd.vae.encode(inputs["image"])
    assert_close(mean, expected["mean"])
    assert_close(logvar, expected["logvar"])
    assert_close(sd.vae.decode(inputs["z"], slice_size=2), expected["decoded"])
    assert_close(sd.text_encoder(inputs["ids"]), expected["context"])


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_full_size_load_holds_one_copy(sd_v1_files, fmt):
    """Peak RSS of a fresh process loading the fp16 file as fp32: the fp32 model plus the file's
    pages (memory-mapped), never a second full copy of the weights."""
    path = getattr(sd_v1_files, fmt)
    code = ("import resource, sys, dreambooth\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "sd = dreambooth.load(sys.argv[1])\n"
            "n = sum(p.numel() for m in (sd.unet, sd.vae, sd.text_encoder) for p in m.parameters())\n"
            "print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, n)\n")
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    before_kib, peak_kib, numel = map(int, result.stdout.split())
    model_bytes, file_bytes = 4 * numel, os.path.getsize(path)
    peak = peak_kib * 1024 - before_kib * 1024
    assert peak < model_bytes + file_bytes + 2**30, (
        f"loading {path.name} raised peak RSS by {peak / 2**30:.2f} GiB "
        f"(fp32 model {model_bytes / 2**30:.2f} GiB, file {file_bytes / 2**30:.2f} GiB)")


# ---- tiny model: determinism, round trips, EMA, formats ---------------------------------------

def state_of(sd) -> dict[str, torch.Tensor]:
    return {prefix + k: v for prefix, m in ((UNET, sd.unet), (VAE, sd.vae), (CLIP, sd.text_encoder))
            for k, v in m.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    dreambooth.save(dreambooth.load("tiny"), path)
    return path


def test_tiny_is_deterministic_and_ignores_global_rng():
    torch.manual_seed(123)
    a = dreambooth.load("tiny")
    state = torch.random.get_rng_state()
    b = dreambooth.load("tiny")
    assert torch.equal(state, torch.random.get_rng_state())
    assert a.name == "tiny" and a.resolution == 64
    for (key, x), y in zip(state_of(a).items(), state_of(b).values()):
        assert torch.equal(x, y), key


def test_round_trip_is_identical_at_saved_dtype(tiny_file, tmp_path):
    first = dreambooth.load(tiny_file)
    assert first.unet.config == UNetConfig.tiny() and first.resolution == 64
    again = tmp_path / "again.safetensors"
    dreambooth.save(first, again)
    second = dreambooth.load(again)
    a, b = load_file(tiny_file), load_file(again)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    for (key, x), y in zip(state_of(first).items(), state_of(second).values()):
        assert torch.equal(x, y), key
    assert torch.equal(state_of(first)[UNET + "out.2.weight"],
                       state_of(dreambooth.load("tiny"))[UNET + "out.2.weight"].half().float())


def test_latent_scale_and_metadata_travel_in_the_file(tmp_path):
    """A model's own latent scale (the toy model's is not SD's 0.18215) is written to the file and read back; files
    without one (every published SD v1 file) get SD's."""
    sd = dreambooth.load("tiny")
    assert sd.latent_scale == 0.18215
    sd.latent_scale = 0.3817
    path = tmp_path / "scaled.safetensors"
    dreambooth.save(sd, path, metadata={"made_by": "a test"})
    assert dreambooth.load(path).latent_scale == 0.3817
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["made_by"] == "a test"
    ckpt = tmp_path / "scaled.ckpt"
    torch.save({"state_dict": load_file(path)}, ckpt)
    assert dreambooth.load(ckpt).latent_scale == 0.18215


def test_the_toys_sampling_settings_travel_in_its_file(tmp_path):
    """The toy's guidance scale and DDIM steps are its file's metadata, as its latent scale is: read into
    StableDiffusion.sampling, written again with a model fine-tuned from it, none for SD v1's files; a value that is
    no number of steps or not finite is refused in one line naming the key."""
    toy = dreambooth.load("toy")
    assert toy.sampling == {"scale": 3.0, "ddim_steps": 25}
    dreambooth.save(toy, tmp_path / "tuned.safetensors")
    assert dreambooth.load(tmp_path / "tuned.safetensors").sampling == {"scale": 3.0, "ddim_steps": 25}
    dreambooth.save(dreambooth.load("tiny"), tmp_path / "sd.safetensors")
    assert dreambooth.load(tmp_path / "sd.safetensors").sampling == {}
    for key, value in (("ddim_steps", "2.5"), ("ddim_steps", "0"), ("guidance_scale", "nan"), ("guidance_scale", "x")):
        save_file(load_file(tmp_path / "sd.safetensors"), tmp_path / "bad.safetensors", metadata={key: value})
        with pytest.raises(CheckpointError, match=f"metadata {key} is '{value}', not a"):
            dreambooth.load(tmp_path / "bad.safetensors")


@torch.no_grad()
def test_vae_norm_groups_travel_in_the_file(tmp_path):
    """GroupNorm's groups do not show in the weights' shapes, so a VAE with other groups than SD's 32 (the toy
    model's 8) says so in the file's metadata, and loads back with them; a file with a bad count is refused."""
    sd = dreambooth.load("tiny")
    sd.vae = random_model(AutoencoderKL, replace(sd.vae.config, norm_groups=8)).eval()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    path = tmp_path / "groups.safetensors"
    dreambooth.save(sd, path)
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["vae_norm_groups"] == "8"
    loaded = dreambooth.load(path).vae
    assert loaded.config.norm_groups == 8
    assert_close(loaded.decode(z), sd.vae.half().float().decode(z))
    vae_file = tmp_path / "vae.safetensors"  # a VAE alone, as sample.py --vae reads it
    save_file({k: v for k, v in load_file(path).items() if k.startswith(VAE)}, vae_file,
              metadata={"vae_norm_groups": "8"})
    assert dreambooth.load_vae(vae_file).config.norm_groups == 8
    dreambooth.save(dreambooth.load("tiny"), tmp_path / "sd.safetensors")
    with safe_open(tmp_path / "sd.safetensors", framework="pt") as f:
        assert "vae_norm_groups" not in f.metadata()
    for bad in ("7", "eight", "0"):
        save_file(load_file(path), tmp_path / "bad.safetensors", metadata={"vae_norm_groups": bad})
        with pytest.raises(CheckpointError, match=f"bad.safetensors: metadata vae_norm_groups is '{bad}', not"):
            dreambooth.load(tmp_path / "bad.safetensors")


def test_save_writes_compvis_schedule_and_fp16(tiny_file):
    """alphas_cumprod exactly; the rest are derived from its float32 values, so they carry up to
    ~5e-5 relative error against CompVis' float64 computation (betas ~ 1 - a ratio near 1)."""
    state = load_file(tiny_file)
    for key, expected in compvis_schedule().items():
        assert state[key].dtype == torch.float32
        torch.testing.assert_close(state[key], expected, rtol=1e-4, atol=0, msg=key)
    assert torch.equal(state["alphas_cumprod"], compvis_schedule()["alphas_cumprod"])
    assert all(v.dtype == torch.float16 for k, v in state.items() if k.startswith((UNET, VAE, CLIP)))


def test_load_dtype_and_bare_state_dict_ckpt(tiny_file, tmp_path):
    path = tmp_path / "bare.ckpt"
    torch.save(load_file(tiny_file), path)
    sd = dreambooth.load(path, dtype=torch.float16)
    assert sd.name == "bare.ckpt"
    assert all(p.dtype == torch.float16 for p in sd.unet.parameters())
    for (key, x), y in zip(state_of(sd).items(), state_of(dreambooth.load(tiny_file)).values()):
        assert torch.equal(x.float(), y), key


def test_ema_weights_follow_diffusers_naming(tiny_file, tmp_path):
    """model_ema.* (LitEma strips the dots) is read back as the UNet; diffusers' own converter
    with extract_ema=True is the independent reference for the naming."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    state = load_file(tiny_file)
    ema = {"model_ema." + k[len("model."):].replace(".", ""): v + 1 for k, v in state.items() if k.startswith(UNET)}
    state.update(ema)
    state.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7)})
    path = tmp_path / "full-ema.ckpt"
    write_lightning_ckpt(state, path)

    config = diffusers_unet_config(UNetConfig.tiny())
    for use_ema in (False, True):
        ours = state_of(dreambooth.load(path, ema=use_ema, dtype=torch.float16))
        expected = convert_ldm_unet_checkpoint(state, config, extract_ema=use_ema)
        assert convert_ldm_unet_checkpoint(ours, config).keys() == expected.keys()
        for key, value in convert_ldm_unet_checkpoint(ours, config).items():
            assert torch.equal(value, expected[key]), key


# ---- save() output opens in diffusers' single-file loader --------------------------------------

@torch.no_grad()
def test_saved_file_opens_in_diffusers_pipeline(tmp_path):
    path = tmp_path / "tiny.safetensors"
    dreambooth.save(dreambooth.load("tiny"), path)
    sd = dreambooth.load(path)
    pipe = single_file_pipeline(path, sd, tmp_path / "config")
    inputs = parity_inputs(sd.unet.config, sd.text_encoder.config, latent=8, image=32)
    expected = pipe.unet(inputs["x"], inputs["t"], encoder_hidden_states=inputs["context"]).sample
    assert_close(sd.unet(inputs["x"], inputs["t"], inputs["context"]), expected)
    assert_close(sd.vae.decode(inputs["z"]), pipe.vae.decode(inputs["z"]).sample)
    assert_close(sd.text_encoder(inputs["ids"]), pipe.text_encoder(inputs["ids"]).last_hidden_state)


# ---- save() refuses and never leaves a half-written file ---------------------------------------

def test_save_refuses_other_suffixes(tmp_path):
    with pytest.raises(CheckpointError, match=r"model\.ckpt must end in \.safetensors"):
        dreambooth.save(dreambooth.load("tiny"), tmp_path / "model.ckpt")


def test_save_is_atomic(tiny_file, tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    path.write_bytes(tiny_file.read_bytes())

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(dreambooth.checkpoint, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        dreambooth.save(dreambooth.load("tiny"), path)
    assert path.read_bytes() == tiny_file.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


# ---- unsafe and wrong files: one clear line each -----------------------------------------------

class Payload:
    """Unpickling this runs os.system(command): what a malicious checkpoint would do."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_malicious_pickle_is_refused_and_never_runs(tiny_file, tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": load_file(tiny_file), "payload": Payload(f"touch {marker}")}, path)
    with pytest.raises(CheckpointError, match=rf"refusing to load .*evil\.ckpt: it asks to run {os.system.__module__}\.system"):
        dreambooth.load(path)
    assert not marker.exists()


def write(tmp_path, name, state):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


def modified_tiny(tiny_file, drop=(), add=None):
    state = {k: v for k, v in load_file(tiny_file).items() if k not in drop}
    state.update(add or {})
    return state


z = torch.zeros
WRONG_FAMILIES = {
    "sd2-openclip": ({"cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": z(3072, 1024),
                      UNET + "input_blocks.0.0.weight": z(320, 4, 3, 3)}, r"is an SD 2\.x model \(OpenCLIP"),
    "sd2-context": ({UNET + "input_blocks.0.0.weight": z(320, 4, 3, 3),
                     UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": z(320, 1024)},
                    r"is an SD 2\.x model \(1024-dim text context\)"),
    "sdxl": ({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": z(768),
              UNET + "input_blocks.0.0.weight": z(320, 4, 3, 3)}, r"is an SDXL model"),
    "inpainting": ({UNET + "input_blocks.0.0.weight": z(320, 9, 3, 3)},
                   r"is an inpainting model: its UNet takes 9 input channels"),
    "vae-only": ({"encoder.conv_in.weight": z(128, 3, 3, 3), "decoder.conv_in.weight": z(512, 4, 3, 3)},
                 r"is a VAE-only file"),
    "lora": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": z(4, 320)}, r"is a LoRA"),
    "diffusers-unet": ({"down_blocks.0.resnets.0.conv1.weight": z(320, 320, 3, 3)}, r"is in diffusers format"),
    "not-sd": ({"fc.weight": z(2, 2)}, r"is not an SD v1 checkpoint: it has no model\.diffusion_model\.\* keys"),
}


@pytest.mark.parametrize("name", WRONG_FAMILIES)
def test_wrong_family_says_what_the_file_is(tmp_path, name):
    state, message = WRONG_FAMILIES[name]
    path = write(tmp_path, f"{name}.safetensors", state)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))} {message}"):
        dreambooth.load(path)


BAD_KEYS = {
    "missing": (dict(drop=[UNET + "out.2.bias"]), r"missing key model\.diffusion_model\.out\.2\.bias$"),
    "unexpected": (dict(add={VAE + "encoder.extra.weight": z(2)}), r"unexpected key first_stage_model\.encoder\.extra\.weight$"),
    "stray": (dict(add={"cond_stage_model.transformer.foo": z(2)}), r"unexpected key cond_stage_model\.transformer\.foo$"),
    "shape": (dict(add={CLIP + "final_layer_norm.weight": z(31)}),
              r"cond_stage_model\.transformer\.text_model\.final_layer_norm\.weight has shape \[31\], expected \[32\]$"),
    "schedule": (dict(add={"alphas_cumprod": torch.linspace(0.9999, 0.01, 1000)}), r"alphas_cumprod is not SD v1's schedule"),
}


@pytest.mark.parametrize("name", BAD_KEYS)
def test_bad_key_is_named(tiny_file, tmp_path, name):
    change, message = BAD_KEYS[name]
    path = write(tmp_path, f"{name}.safetensors", modified_tiny(tiny_file, **change))
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: {message}"):
        dreambooth.load(path)


def test_ema_asked_but_absent(tiny_file):
    with pytest.raises(CheckpointError, match=r"tiny\.safetensors has no EMA weights \(model_ema\.\*\)"):
        dreambooth.load(tiny_file, ema=True)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_truncated_file(tiny_file, tmp_path, suffix):
    source = tmp_path / f"whole{suffix}"
    if suffix == ".ckpt":
        torch.save({"state_dict": load_file(tiny_file)}, source)
    else:
        source.write_bytes(tiny_file.read_bytes())
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"cut\{suffix} is truncated or corrupt"):
        dreambooth.load(path)


def test_missing_path_and_folders(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.ckpt does not exist$"):
        dreambooth.load(tmp_path / "nope.ckpt")
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"pipeline is a diffusers-format folder"):
        dreambooth.load(tmp_path / "pipeline")
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(tmp_path))} is a folder, not a checkpoint file$"):
        dreambooth.load(tmp_path)
