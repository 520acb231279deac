"""The three programs given bad input as a careless or hostile user would give it: each case ends in one line that
names the file, flag or path (exit 1, or 2 for a flag), before any image is written, and nothing already written is
lost or replaced."""
import errno
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

import cli
import dreambooth
import make_prior
import sample
import train
from tests.conftest import run
from tests.references import random_lora

pytestmark = pytest.mark.usefixtures("one_thread")


def one_line(error: SystemExit, program: str) -> str:
    """The message of a program's SystemExit, checked to be the one line a person reads."""
    message = str(error)
    assert message.startswith(f"{program}: error: ") and "\n" not in message, message
    return message


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n"


def test_photos_in_other_formats_are_refused_or_named(photos, tmp_path, capsys):
    """An EPS file named like a photo stops the run in one line (Pillow would hand it to Ghostscript); a GIF or TIFF
    beside the photos is skipped with a note naming it, instead of without a word."""
    folder = shutil.copytree(photos / "instance", tmp_path / "instance")
    Image.new("RGB", (80, 72), (0, 99, 0)).save(folder / "moving.gif")
    Image.new("RGB", (80, 72), (0, 99, 0)).save(folder / "scan.TIFF", format="TIFF")
    run(tmp_path, tmp_path / "run", "--steps", "1", prior=None)
    printed = capsys.readouterr().out
    assert f"note: {folder / 'moving.gif'}: skipped; photos are read as JPEG, PNG, WebP or BMP only" in printed
    assert f"note: {folder / 'scan.TIFF'}: skipped" in printed

    (folder / "x.jpg").write_bytes(EPS)
    (tmp_path / "prior").mkdir()
    (tmp_path / "prior" / "00.png").write_bytes(EPS)
    for instance, prior, bad in (("instance", None, folder / "x.jpg"), ("one", "prior", tmp_path / "prior/00.png")):
        shutil.copytree(photos / "one", tmp_path / "one", dirs_exist_ok=True)
        with pytest.raises(SystemExit) as e:
            run(tmp_path, tmp_path / f"run-{instance}", "--steps", "1", instance=instance, prior=prior)
        assert one_line(e.value, "train.py") == (f"train.py: error: {bad}: cannot read image (not a JPEG, PNG, WebP "
                                                 "or BMP file)")


# ---- flags: numbers that are not finite or out of range are usage errors (exit 2) ---------------------------------

@pytest.mark.parametrize("program, flags, message", [
    ("sample.py", ["--prompt", "x", "--scale", "nan"], "argument --scale: nan: must be a finite number"),
    ("sample.py", ["--prompt", "x", "--scale=-inf"], "argument --scale: -inf: must be a finite number"),
    ("sample.py", ["--prompt", "x", "--ddim_eta", "nan"], "argument --ddim_eta/--ddim-eta: nan: must be a finite"),
    ("sample.py", ["--prompt", "x", "--lora", "a.safetensors:nan"], "argument --lora: a.safetensors:nan: SCALE must "
                                                                    "be a finite number"),
    ("sample.py", ["--prompt", "x", "--seed", str(2**70)], f"argument --seed: {2**70}: must be from 0 to"),
    ("make_prior.py", ["--class", "dog", "--scale", "inf"], "argument --scale: inf: must be a finite number"),
    ("make_prior.py", ["--class", "dog", "--seed", "-1"], "argument --seed: -1: must be from 0 to"),
    ("train.py", ["--lr", "nan"], "argument --lr: nan: must be a finite number"),
    ("train.py", ["--prior-weight", "NaN"], "argument --prior-weight: NaN: must be a finite number"),
    ("train.py", ["--clip-grad", "inf"], "argument --clip-grad: inf: must be a finite number"),
    ("train.py", ["--lora-alpha", "nan"], "argument --lora-alpha: nan: must be a finite number"),
    ("train.py", ["--seed", str(2**64)], f"argument --seed: {2**64}: must be from 0 to"),
    ("train.py", ["--resolution", "8"], "argument --resolution: 8: must be a multiple of 8, at least 64"),
    ("train.py", ["--resolution", "56"], "argument --resolution: 56: must be a multiple of 8, at least 64"),
])
def test_numbers_that_are_not_finite_or_out_of_range_are_usage_errors(program, flags, message, capsys):
    main = {"sample.py": sample.main, "make_prior.py": make_prior.main, "train.py": train.main}[program]
    with pytest.raises(SystemExit) as e:
        main(flags + (["--instance", "x", "--class", "dog"] if program == "train.py" else []))
    assert e.value.code == 2
    assert f"{program}: error: {message}" in capsys.readouterr().err


# ---- values that would make black images stop the program before any image is written ------------------------------

@pytest.fixture(scope="module")
def bad_models(tmp_path_factory):
    """A tiny model file with one nan weight, one with a latent scale of 0, and a LoRA for the tiny model."""
    folder = tmp_path_factory.mktemp("bad_models")
    state = load_file(dreambooth.checkpoint.TOY_FILE)
    state["model.diffusion_model.out.2.bias"][1] = math.nan
    save_file(state, folder / "nan.safetensors")
    save_file(load_file(dreambooth.checkpoint.TOY_FILE), folder / "zero-scale.safetensors",
              metadata={"format": "pt", "latent_scale": "0"})
    random_lora(dreambooth.load("tiny"), folder / "lora.safetensors")
    return folder


@pytest.mark.parametrize("program", ["sample.py", "make_prior.py"])
@pytest.mark.parametrize("ckpt, lora, message", [
    ("nan.safetensors", None, r"nan\.safetensors: model\.diffusion_model\.out\.2\.bias holds values that are not "
                              r"finite \(nan or inf\) as torch\.float32$"),
    ("zero-scale.safetensors", None, r"zero-scale\.safetensors: metadata latent_scale is '0', not a number above 0$"),
    ("tiny", "lora.safetensors:1e9", r"the sampled latents are not finite \(nan or inf\): the model overflows .*; "),
], ids=["nan-weight", "latent-scale-0", "huge-lora"])
def test_what_would_make_black_images_stops_before_any_is_written(bad_models, tmp_path, program, ckpt, lora,
                                                                   message):
    outdir = tmp_path / "out"
    flags = ["--ckpt", str(bad_models / ckpt) if ckpt != "tiny" else ckpt, "--ddim_steps", "2", "--outdir",
             str(outdir)] + (["--lora", str(bad_models / lora)] if lora else [])
    with pytest.raises(SystemExit) as e:
        if program == "sample.py":
            sample.main(flags + ["--prompt", "a dog"])
        else:
            make_prior.main(flags + ["--class", "dog", "--num", "2"])
    assert re.search(message, one_line(e.value, program))
    assert not [p for p in outdir.rglob("*") if p.suffix == ".png"]
    assert not (outdir / "manifest.jsonl").exists() or not (outdir / "manifest.jsonl").read_text()


def test_a_diffusers_folder_is_named_as_one(tmp_path):
    (tmp_path / "sd-diffusers" / "unet").mkdir(parents=True)
    (tmp_path / "sd-diffusers" / "model_index.json").write_text("{}")
    for flag in ("--ckpt", "--lora"):
        with pytest.raises(SystemExit) as e:
            sample.main([flag, str(tmp_path / "sd-diffusers"), "--prompt", "x", "--outdir", str(tmp_path / "out")])
        assert "sd-diffusers is a diffusers-format folder" in one_line(e.value, "sample.py")


# ---- places that cannot be written: one line naming the path, before the model loads --------------------------------

def programs_writing_to(folder, photos, tmp_path):
    """Each program's command line writing into `folder`; the checkpoint is a broken file, so an error that comes
    before the model loads names the folder, and one that comes after names the checkpoint."""
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"not a checkpoint")
    return {
        "sample.py": (sample.main, ["--ckpt", str(broken), "--prompt", "x", "--outdir", str(folder)], "--outdir"),
        "make_prior.py": (make_prior.main, ["--ckpt", str(broken), "--class", "dog", "--outdir", str(folder)],
                          "--outdir"),
        "train.py": (train.main, ["--ckpt", str(broken), "--instance", str(photos / "instance"), "--class", "dog",
                                  "--out", str(folder)], "--out"),
    }


def read_only(tmp_path):
    """A folder this process cannot write in: a mode 555 one, or for root (who may write there) sysfs."""
    if os.geteuid() != 0:
        (tmp_path / "locked").mkdir(mode=0o555)
        return tmp_path / "locked"
    try:
        with tempfile.TemporaryFile(dir="/sys"):
            pass
    except PermissionError:
        return Path("/sys")
    except OSError:
        pass
    pytest.skip("no folder here that root cannot write in")


@pytest.mark.parametrize("program", ["sample.py", "make_prior.py", "train.py"])
@pytest.mark.parametrize("where", ["a file", "under a file", "read-only"])
def test_a_folder_that_cannot_be_written_is_named_before_the_model_loads(photos, tmp_path, program, where):
    (tmp_path / "notes.txt").write_text("keep me")
    folder = {"a file": tmp_path / "notes.txt", "under a file": tmp_path / "notes.txt" / "out",
              "read-only": read_only(tmp_path) / "out"}[where]
    main, flags, flag = programs_writing_to(folder, photos, tmp_path)[program]
    with pytest.raises(SystemExit) as e:
        main(flags)
    message = one_line(e.value, program)
    assert message.startswith(f"{program}: error: {flag} {folder}: cannot write there ("), message
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def disk_full_after(n, save_png):
    """save_png that writes n images, then fails as a full disk does."""
    written = []

    def save(image, path, parameters=None):
        if len(written) == n:
            raise OSError(errno.ENOSPC, "No space left on device", str(path.with_name(f".{path.name}.1.tmp")))
        save_png(image, path, parameters)
        written.append(path)
    return save


def pngs_fill_the_disk_after(n, write_atomic):
    """write_atomic that writes n PNG files, then fails on the next as a full disk does (other files are written)."""
    written = []

    def write(path, contents):
        if path.suffix == ".png":
            if len(written) == n:
                raise OSError(errno.ENOSPC, "No space left on device", str(path.with_name(f".{path.name}.1.tmp")))
            written.append(path)
        write_atomic(path, contents)
    return write


def test_a_full_disk_while_sampling_is_one_line_and_keeps_the_images_before(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "save_png", disk_full_after(2, cli.save_png))
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", "tiny", "--ddim_steps", "2", "--prompt", "a dog", "--n_samples", "3", "--outdir",
                     str(tmp_path)])
    assert one_line(e.value, "sample.py") == (f"sample.py: error: writing {tmp_path / '00002.png'} failed (No space "
                                              f"left on device); the 2 images before it are in {tmp_path}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.png", "00001.png"]


def test_a_full_disk_while_making_the_prior_is_one_line_and_the_same_command_goes_on(tmp_path, monkeypatch):
    flags = ["--ckpt", "tiny", "--ddim_steps", "2", "--class", "dog", "--num", "3", "--batch-size", "1",
             "--outdir", str(tmp_path)]
    monkeypatch.setattr(make_prior, "write_atomic", pngs_fill_the_disk_after(1, make_prior.write_atomic))
    with pytest.raises(SystemExit) as e:
        make_prior.main(flags)
    assert one_line(e.value, "make_prior.py").startswith(
        f"make_prior.py: error: writing {tmp_path / '00001.png'} failed (No space left on device); the images "
        f"finished so far are in {tmp_path}/")
    monkeypatch.undo()
    make_prior.main(flags)
    assert len((tmp_path / "manifest.jsonl").read_text().splitlines()) == 3


# ---- text files that are not what they should be -------------------------------------------------------------------

NOT_TEXT = b"\xff\xfe\x00garbage\x80\n"


def test_bad_manifest_and_prompt_files_are_one_line(photos, tmp_path, capsys):
    prior = shutil.copytree(photos / "prior", tmp_path / "prior")
    lines = ['{"file": "00.png", "prompt": "a dog"}', '{"file": "01.png", "prompt": 5}']
    for content, where in (("\n".join(lines), r"line 2 is not make_prior\.py's manifest \(TypeError"),
                           ('{"file": "00.png", "prompt": "a dog"}\n[1, 2]', r"line 2 is not make_prior\.py's"),
                           (NOT_TEXT, r"is not make_prior\.py's manifest \(not text")):
        (prior / "manifest.jsonl").write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(SystemExit) as e:
            run(tmp_path, tmp_path / "run", "--steps", "1", instance="../" + str(photos / "instance"))
        assert re.search(rf"^train\.py: error: {re.escape(str(prior / 'manifest.jsonl'))} {where}",
                         one_line(e.value, "train.py"))

    outdir = tmp_path / "made"
    outdir.mkdir()
    (outdir / "manifest.jsonl").write_bytes(NOT_TEXT)
    with pytest.raises(SystemExit) as e:
        make_prior.main(["--ckpt", "tiny", "--class", "dog", "--num", "1", "--outdir", str(outdir)])
    assert "manifest.jsonl is not make_prior.py's manifest (not text" in one_line(e.value, "make_prior.py")
    assert (outdir / "manifest.jsonl").read_bytes() == NOT_TEXT

    (tmp_path / "prompts.txt").write_bytes(NOT_TEXT)
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", "tiny", "--from-file", str(tmp_path / "prompts.txt")])
    assert e.value.code == 2
    assert f"sample.py: error: --from-file {tmp_path / 'prompts.txt'}: not text (" in capsys.readouterr().err


def test_an_image_the_manifest_does_not_list_is_not_replaced(tmp_path):
    """--num 3 over a folder of 2 listed images and someone else's 00002.png: refused, and that file kept."""
    flags = ["--ckpt", "tiny", "--ddim_steps", "2", "--class", "dog", "--batch-size", "1", "--outdir", str(tmp_path)]
    make_prior.main(flags + ["--num", "2"])
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "00002.png")
    before = (tmp_path / "00002.png").read_bytes()
    with pytest.raises(SystemExit) as e:
        make_prior.main(flags + ["--num", "3"])
    assert one_line(e.value, "make_prior.py") == (
        f"make_prior.py: error: {tmp_path / '00002.png'} is not in {tmp_path / 'manifest.jsonl'} nor an image this "
        "command makes; move it away or choose another --outdir")
    assert (tmp_path / "00002.png").read_bytes() == before
