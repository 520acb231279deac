"""Files the loaders refuse (dreambooth.load, load_vae, load_lora, train.py's train state), each in one line naming
the file: pickles that loop or nest without end, zip members torch.save never writes (a zip bomb), tensors that are
not dense weights, values that are not finite, LoRA adapters whose shapes or alpha make no sense."""
import contextlib
import math
import re
import signal
import zipfile

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import dreambooth
import sample
import train
from dreambooth.checkpoint import UNET, VAE, CheckpointError
from dreambooth.lora import load_lora
from tests.references import random_lora


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    dreambooth.save(dreambooth.load("tiny"), path, dtype=torch.float32)
    return path


@contextlib.contextmanager
def fails_rather_than_hangs(seconds=60):
    """A loader that loops forever fails the test (with a TimeoutError) instead of hanging the suite."""
    def stop(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: it loops")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def loops():
    """Dicts whose "state_dict" leads back to themselves, or nests deeper than any real file."""
    itself = {}
    itself["state_dict"] = itself
    a, b = {"epoch": 3}, {"global_step": 7}
    a["state_dict"], b["state_dict"] = b, a
    deep = {"w": torch.zeros(1)}
    for _ in range(50):
        deep = {"state_dict": deep}
    return {"itself": itself, "two": a, "deep": deep}


@pytest.mark.parametrize("name", ["itself", "two", "deep"])
@pytest.mark.parametrize("loader", [dreambooth.load, dreambooth.load_vae, lambda path: load_lora(
    dreambooth.load("tiny"), path)], ids=["load", "load_vae", "load_lora"])
def test_a_pickle_that_loops_is_refused_not_followed(tmp_path, name, loader):
    path = tmp_path / f"{name}.ckpt"
    torch.save(loops()[name], path)
    with fails_rather_than_hangs(), pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: its state_dict "
                                                                         "entries nest in a loop or more than"):
        loader(path)


def rezip(source, target, compress=zipfile.ZIP_DEFLATED, pad=0):
    """source's members written again to target, compressed (torch.save never compresses); data.pkl padded with
    `pad` zero bytes, which compress to almost nothing."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for member in old.infolist():
            data = old.read(member) + (b"\0" * pad if member.filename.endswith("data.pkl") else b"")
            new.writestr(member.filename, data, compress_type=compress)
    return target


def test_compressed_zip_members_are_refused_before_reading(tiny_file, tmp_path):
    source = tmp_path / "whole.ckpt"
    torch.save({"state_dict": load_file(tiny_file)}, source)
    bomb = rezip(source, tmp_path / "bomb.ckpt", pad=50_000_000)  # 50 MB of pickle in a file of a few MB
    assert bomb.stat().st_size < 5 * source.stat().st_size
    for path, how in ((bomb, "deflated"), (rezip(source, tmp_path / "bz.ckpt", zipfile.ZIP_BZIP2), "bzip2")):
        with pytest.raises(CheckpointError, match=rf"^refusing to load {re.escape(str(path))}: its member "
                                                  r"\S+ is compressed, which torch.save never does$"):
            dreambooth.load(path)


def test_a_member_larger_than_the_file_is_refused(tmp_path):
    path = tmp_path / "forged.ckpt"
    torch.save({"w": torch.zeros(4)}, path)
    data = bytearray(path.read_bytes())
    central = data.rindex(b"PK\x01\x02")  # the last member's central directory entry: its uncompressed size at +24
    data[central + 24:central + 28] = (2**31).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"claims 2147483648 bytes, more than the whole file's"):
        dreambooth.load(path)


@pytest.mark.parametrize("state, message", [
    ({5: torch.zeros(2)}, r"key 5 is not a name"),
    ({"w": torch.zeros(3).to_sparse()}, r"w is a torch.sparse_coo tensor; a checkpoint holds dense weights"),
    ({"w": torch.zeros(3, device="meta")}, r"w is a meta tensor"),
    ({"state_dict": {"b": torch.zeros(1), "w": torch.eye(3).to_sparse()}}, r"w is a torch.sparse_coo tensor"),
], ids=["int-key", "sparse", "meta", "wrapped-sparse"])
def test_tensors_that_are_not_dense_weights_are_named(tmp_path, state, message):
    path = tmp_path / "odd.ckpt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: {message}"):
        dreambooth.load(path)


@pytest.mark.parametrize("key, value, dtype", [
    (UNET + "out.2.bias", math.nan, torch.float32),
    (VAE + "decoder.conv_out.weight", -math.inf, torch.float32),
    (UNET + "input_blocks.0.0.bias", 1e6, torch.float16),  # finite in the file, inf as float16
])
def test_weights_that_are_not_finite_are_named(tiny_file, tmp_path, key, value, dtype):
    state = load_file(tiny_file)
    state[key] = state[key].clone().flatten().index_fill(0, torch.tensor([0]), value).view(state[key].shape)
    path = tmp_path / "nan.safetensors"
    save_file(state, path)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: {re.escape(key)} holds values that are "
                                              r"not finite \(nan or inf\)"):
        dreambooth.load(path, dtype=dtype)
    if key.startswith(VAE):  # the same through --vae: a VAE file as published
        vae = tmp_path / "vae.safetensors"
        save_file({k: v for k, v in state.items() if k.startswith(VAE)}, vae)
        with pytest.raises(CheckpointError, match=rf"^{re.escape(str(vae))}: {re.escape(key)} holds values"):
            dreambooth.load_vae(vae)


@pytest.mark.parametrize("value", ["0", "-0.18", "nan", "inf", "abc", ""])
def test_a_latent_scale_that_is_not_a_positive_number_is_named(tiny_file, tmp_path, value):
    path = tmp_path / "scale.safetensors"
    save_file(load_file(tiny_file), path, metadata={"format": "pt", "latent_scale": value})
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: metadata latent_scale is "
                                              rf"{re.escape(repr(value))}, not a number above 0$"):
        dreambooth.load(path)


# ---- LoRA files ---------------------------------------------------------------------------------------------------

NAME = "lora_unet_down_blocks_0_attentions_0_proj_in"  # the tiny UNet's first adapted layer: [32, 32, 1, 1]


@pytest.mark.parametrize("tensors, message", [
    ({"lora_down.weight": torch.zeros(0, 32, 1, 1), "lora_up.weight": torch.zeros(32, 0, 1, 1)},
     r" has lora_down \[0, 32, 1, 1\] and lora_up \[32, 0, 1, 1\], not \[rank, in\] and \[out, rank\] with a rank"),
    ({"lora_down.weight": torch.zeros(4, 32, 1, 1), "lora_up.weight": torch.zeros(32, 8, 1, 1)},
     r" has lora_down \[4, 32, 1, 1\] and lora_up \[32, 8, 1, 1\]"),
    ({"lora_down.weight": torch.zeros(4, 32), "lora_up.weight": torch.zeros(32, 4, 1, 1)}, r" has lora_down \[4, 32\]"),
    ({"lora_down.weight": torch.zeros(4, 32, 1, 1), "lora_up.weight": torch.zeros(32, 4, 1, 1),
      "alpha": torch.tensor(math.nan)}, r"\.alpha is nan, not one finite number"),
    ({"lora_down.weight": torch.zeros(4, 32, 1, 1), "lora_up.weight": torch.zeros(32, 4, 1, 1),
      "alpha": torch.ones(2)}, r"\.alpha is 2 values, not one finite number"),
    ({"lora_down.weight": torch.full((4, 32, 1, 1), math.nan), "lora_up.weight": torch.ones(32, 4, 1, 1)},
     r" at scale 1 changes its layer by values that are not finite"),
], ids=["rank-0", "ranks-differ", "ndim-differ", "alpha-nan", "alpha-two", "weights-nan"])
def test_lora_adapters_that_make_no_sense_are_named(tmp_path, tensors, message):
    path = tmp_path / "odd.safetensors"
    save_file({f"{NAME}.{kind}": t for kind, t in tensors.items()}, path)
    sd = dreambooth.load("tiny")
    before = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: {NAME}{message}"):
        load_lora(sd, path)
    assert all(torch.equal(v, before[k]) for k, v in sd.unet.state_dict().items())  # nothing half-applied


def test_a_lora_scale_that_overflows_is_refused(tmp_path):
    path = tmp_path / "lora.safetensors"
    random_lora(dreambooth.load("tiny"), path)
    with pytest.raises(ValueError, match=r"lora\.safetensors: the scale nan is not a finite number"):
        load_lora(dreambooth.load("tiny"), path, math.nan)
    with pytest.raises(CheckpointError, match=r"at scale 1e\+300 changes its layer by values that are not finite"):
        load_lora(dreambooth.load("tiny"), path, 1e300)  # a float64 number; no float32 weight holds it


@pytest.mark.parametrize("content, what", [
    (b"hello, this is not a model\nline two",
     "is a text file, not a checkpoint (it begins 'hello, this is not a model')"),
    (b"<!DOCTYPE html><html><body>404</body></html>", "is an HTML page (a download that failed?), not a checkpoint"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 4265380512\n",
     "is a Git LFS pointer, not the file itself (git lfs pull fetches it)"),
    (b"", "is empty"),
])
@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_a_file_that_is_no_checkpoint_is_named_for_what_it_is(tmp_path, capsys, content, what, suffix):
    """A text file, a web page saved by a failed download, a Git LFS pointer or an empty file given as --ckpt is
    called what it is, in the one line train.py prints before anything else (not "truncated or corrupt")."""
    path = tmp_path / f"model{suffix}"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="^" + re.escape(f"{path} {what}") + "$"):
        dreambooth.load(path)
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (64, 64), "red").save(photos / "00.png")
    with pytest.raises(SystemExit) as e:
        train.main(["--ckpt", str(path), "--instance", str(photos), "--class", "dog", "--out", str(tmp_path / "run")])
    assert str(e.value.code) == f"train.py: error: --ckpt {path} {what}"
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(path), "--prompt", "a dog", "--outdir", str(tmp_path / "out")])
    assert str(e.value.code) == f"sample.py: error: --ckpt {path} {what}"
    assert "learning rate" not in capsys.readouterr().out
