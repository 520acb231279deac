"""make_toy.py in miniature: a few steps of each phase on a few pictures, to check what it writes and --vae-from.
(What the real run learns is checked by test_toy.py and measured by benchmarks/toy.py.)"""
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dreambooth
import make_toy

pytestmark = pytest.mark.usefixtures("one_thread")
FEW_STEPS = ["--vae-steps", "2", "--unet-steps", "2", "--decoder-steps", "2", "--threads", "1"]


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setattr(make_toy, "PER_CAPTION", 2)  # 24 pictures for the UNet, not 9,600


def test_a_run_writes_a_toy_file_and_the_subject(tmp_path, small):
    make_toy.main(FEW_STEPS + ["--out", str(tmp_path / "toy.safetensors"), "--subject-dir", str(tmp_path / "subj")])
    sd = dreambooth.load(tmp_path / "toy.safetensors")
    assert sd.resolution == 64 and sd.latent_scale != dreambooth.vae.LATENT_SCALE
    tiny = dreambooth.load("tiny")
    assert not torch.equal(sd.unet.input_blocks[0][0].weight, tiny.unet.input_blocks[0][0].weight)
    assert not torch.equal(sd.vae.decoder.conv_out.weight, tiny.vae.decoder.conv_out.weight)
    assert len(list((tmp_path / "subj").glob("*.png"))) == 5
    assert sd.vae.config.norm_groups == make_toy.VAE_GROUPS == 8  # read back from the file's metadata
    assert sd.sampling == make_toy.SAMPLING == {"scale": 3.0, "ddim_steps": 25}  # and its sampling settings


def test_it_never_replaces_a_file_or_pictures_unless_forced(tmp_path, monkeypatch):
    """make_toy.py writes a new file by default, not the shipped model; an --out that exists, or a --subject-dir
    that holds pictures, is refused before any training, unless --force."""
    monkeypatch.chdir(tmp_path)
    args = make_toy.parse_args([])
    assert args.out.parts[0] == "runs" and args.out.parent.name.startswith("toy-")
    assert args.out.name == "toy.safetensors"
    assert args.subject_dir == args.out.parent / "subject"
    shipped = dreambooth.checkpoint.TOY_FILE
    before = shipped.read_bytes()
    (tmp_path / "pictures").mkdir()
    (tmp_path / "pictures" / "00.png").write_bytes(b"")
    for flags, why in ((["--out", str(shipped)], f"--out {shipped} exists; give another --out, or --force"),
                       (["--out", "new.safetensors", "--subject-dir", "pictures"], "--subject-dir pictures holds "
                                                                                     "pictures")):
        with pytest.raises(SystemExit) as e:
            make_toy.main(flags)
        assert e.value.code == 2
    assert shipped.read_bytes() == before
    assert make_toy.parse_args(["--out", str(shipped), "--force"]).out == shipped


def test_vae_from_keeps_the_earlier_files_vae_and_trains_a_new_unet(tmp_path, small):
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    make_toy.main(FEW_STEPS + ["--out", str(first), "--subject-dir", str(tmp_path / "subj")])
    make_toy.main(["--vae-from", str(first), "--unet-steps", "3", "--threads", "1", "--out", str(second),
                   "--subject-dir", str(tmp_path / "subj2")])
    a, b = dreambooth.load(first), dreambooth.load(second)
    assert b.latent_scale == a.latent_scale
    assert a.vae.config.norm_groups == b.vae.config.norm_groups == 8
    for (name, x), y in zip(a.vae.state_dict().items(), b.vae.state_dict().values()):
        assert torch.equal(x, y), name
    assert not torch.equal(b.unet.out[2].weight, dreambooth.load("tiny").unet.out[2].weight)  # trained
    with safe_open(second, "pt") as f:
        metadata = f.metadata()
    assert metadata["vae"].startswith("from first.safetensors, made by make_toy.py --seed 4")  # the default seed
    assert (metadata["vae_steps"], metadata["unet_steps"]) == ("2", "3")


def test_vae_from_refuses_a_file_make_toy_did_not_write(tmp_path):
    dreambooth.save(dreambooth.load("tiny"), tmp_path / "tiny.safetensors")
    tensors = load_file(dreambooth.checkpoint.TOY_FILE)  # the toy file less one VAE tensor
    del tensors["first_stage_model.decoder.conv_out.bias"]
    with safe_open(dreambooth.checkpoint.TOY_FILE, "pt") as f:
        save_file(tensors, tmp_path / "cut.safetensors", metadata=f.metadata())
        save_file(load_file(dreambooth.checkpoint.TOY_FILE), tmp_path / "groups.safetensors",
                  metadata={**f.metadata(), "vae_norm_groups": "5"})
    for path, why in ((tmp_path / "tiny.safetensors", "not a file make_toy.py wrote"),
                      (tmp_path / "groups.safetensors", "metadata vae_norm_groups is '5', not a number of groups"),
                      (tmp_path / "missing.safetensors", "cannot read it"),
                      (tmp_path / "cut.safetensors", "its VAE is not the toy's (Missing key(s)")):
        with pytest.raises(SystemExit, match="^" + re.escape(f"make_toy.py: --vae-from {path}: {why}")):
            make_toy.main(["--vae-from", str(path), "--out", str(tmp_path / "out.safetensors")])
        assert not (tmp_path / "out.safetensors").exists()
