"""--vae: a separate KL-f8 VAE file as published (vae-ft-mse-840000-ema-pruned and the like), read by
dreambooth.load_vae, refused with one line when it is something else, and used by sample.py and make_prior.py."""
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import dreambooth
import make_prior
import sample
from dreambooth.checkpoint import VAE
from dreambooth.vae import AutoencoderKL, VAEConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # results compared bit for bit


def other_vae(seed=1):
    """The tiny model's VAE with other weights, so that decoding with it shows."""
    vae = dreambooth.load("tiny").vae
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return vae


def assert_same_weights(ours, expected):
    assert ours.state_dict().keys() == expected.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), expected.state_dict().values()))


def test_full_size_safetensors_as_published_loads(tmp_path):
    """Bare CompVis keys, fp16, plus the keys that only training used: the loss network and LitEma's counters."""
    vae = AutoencoderKL(VAEConfig()).half()
    tensors = {k: v.contiguous() for k, v in vae.state_dict().items()}
    tensors |= {"loss.logvar": torch.zeros(()), "loss.perceptual_loss.net.slice1.0.weight": torch.zeros(64, 3, 3, 3),
                "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(840000)}
    save_file(tensors, tmp_path / "vae-ft-mse-840000-ema-pruned.safetensors")
    loaded = dreambooth.load_vae(tmp_path / "vae-ft-mse-840000-ema-pruned.safetensors", dtype=torch.float16)
    assert loaded.config == VAEConfig()
    assert_same_weights(loaded, vae)


def test_lightning_ckpt_with_the_first_stage_prefix_loads(tmp_path):
    vae = other_vae()
    torch.save({"state_dict": {VAE + k: v for k, v in vae.state_dict().items()}, "global_step": 840000},
               tmp_path / "vae.ckpt")
    assert_same_weights(dreambooth.load_vae(tmp_path / "vae.ckpt"), vae)


@pytest.mark.parametrize("tensors, message", [
    ("full model", r"full\.safetensors is a full SD model \(model\.diffusion_model\.\* keys\), not a VAE"),
    ({"text_model.embeddings.position_ids": torch.zeros(1, 77)}, r"is a text encoder"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, r"is a LoRA"),
    ({"weight": torch.zeros(3)}, r"is not a VAE: it has no encoder\.conv_in\.weight"),
    ("no decoder.conv_out.bias", r"missing key decoder\.conv_out\.bias"),
    ("a stray key", r"unexpected key encoder\.extra"),
])
def test_other_files_are_refused_in_one_line(tmp_path, tensors, message):
    vae = {k: v.contiguous() for k, v in dreambooth.load("tiny").vae.state_dict().items()}
    if tensors == "full model":
        dreambooth.save(dreambooth.load("tiny"), tmp_path / "full.safetensors")
    else:
        if tensors == "no decoder.conv_out.bias":
            tensors = {k: v for k, v in vae.items() if k != "decoder.conv_out.bias"}
        elif tensors == "a stray key":
            tensors = vae | {"encoder.extra": torch.zeros(1)}
        save_file(tensors, tmp_path / "full.safetensors")
    with pytest.raises(dreambooth.CheckpointError, match=message):
        dreambooth.load_vae(tmp_path / "full.safetensors")


def test_sample_py_decodes_with_the_vae_and_says_so(tmp_path, capsys):
    for name, vae in (("same", dreambooth.load("tiny").vae), ("other", other_vae())):
        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, tmp_path / f"{name}.safetensors")
    flags = ["--ckpt", "tiny", "--ddim_steps", "2", "--prompt", "a dog"]
    for name, vae in (("own", []), ("same", ["--vae", str(tmp_path / "same.safetensors")]),
                      ("other", ["--vae", str(tmp_path / "other.safetensors")])):
        sample.main(flags + vae + ["--outdir", str(tmp_path / name)])
    pixels = {name: Image.open(tmp_path / name / "00000.png") for name in ("own", "same", "other")}
    assert pixels["same"].tobytes() == pixels["own"].tobytes()
    assert pixels["other"].tobytes() != pixels["own"].tobytes()
    assert pixels["other"].text["parameters"].endswith("Model: tiny, VAE: other.safetensors")
    assert "VAE" not in pixels["own"].text["parameters"]

    dreambooth.save(dreambooth.load("tiny"), tmp_path / "full.safetensors")
    with pytest.raises(SystemExit, match=r"^sample\.py: error: --vae .*full\.safetensors is a full SD model"):
        sample.main(flags + ["--vae", str(tmp_path / "full.safetensors"), "--outdir", str(tmp_path / "x")])
    with pytest.raises(SystemExit):
        sample.main(flags + ["--vae", str(tmp_path / "missing.safetensors")])
    assert "--vae " + str(tmp_path / "missing.safetensors") + ": no such file" in capsys.readouterr().err


def test_make_prior_records_the_vae(tmp_path):
    save_file({k: v.contiguous() for k, v in other_vae().state_dict().items()}, tmp_path / "other.safetensors")
    make_prior.main(["--class", "dog", "--num", "1", "--ddim_steps", "2", "--ckpt", "tiny", "--outdir",
                     str(tmp_path / "prior"), "--vae", str(tmp_path / "other.safetensors")])
    record = json.loads((tmp_path / "prior" / "manifest.jsonl").read_text())
    assert record["vae"] == "other.safetensors"
    assert Image.open(tmp_path / "prior" / "00000.png").text["parameters"].endswith("VAE: other.safetensors")


def test_make_prior_refuses_to_mix_vaes(tmp_path):
    """A folder begun with --vae is not continued without it, nor one begun without it with a --vae."""
    save_file({k: v.contiguous() for k, v in other_vae().state_dict().items()}, tmp_path / "other.safetensors")
    flags = ["--class", "dog", "--ddim_steps", "2", "--ckpt", "tiny", "--batch-size", "1"]
    vae = str(tmp_path / "other.safetensors")
    make_prior.main(flags + ["--num", "1", "--outdir", str(tmp_path / "a"), "--vae", vae])
    with pytest.raises(SystemExit, match=r"holds images made with vae 'other\.safetensors', not None"):
        make_prior.main(flags + ["--num", "2", "--outdir", str(tmp_path / "a")])
    make_prior.main(flags + ["--num", "1", "--outdir", str(tmp_path / "b")])
    with pytest.raises(SystemExit, match=r"holds images made with vae None, not 'other\.safetensors'"):
        make_prior.main(flags + ["--num", "2", "--outdir", str(tmp_path / "b"), "--vae", vae])
