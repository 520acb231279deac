"""sample.py end to end on the built-in tiny model: files, metadata, reproducibility, never overwriting, bad flags."""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sample

pytestmark = pytest.mark.usefixtures("one_thread")  # results compared bit for bit

REPO = Path(__file__).resolve().parents[1]
FAST = ["--ckpt", "tiny", "--ddim_steps", "3"]


def parameters(path):
    with Image.open(path) as img:
        return img.text["parameters"]


def pixels(path):
    with Image.open(path) as img:
        return np.asarray(img, dtype=np.int16)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("samples")
    sample.main(FAST + ["--prompt", "a dog", "--negative-prompt", "blurry", "--H", "64", "--W", "128",
                        "--n_samples", "2", "--seed", "7", "--outdir", str(outdir)])
    return outdir


def test_writes_numbered_pngs_with_a1111_parameters_and_a_grid(first_run):
    assert sorted(p.name for p in first_run.iterdir()) == ["00000.png", "00001.png", "grid-0000.png"]
    for k in range(2):
        with Image.open(first_run / f"{k:05d}.png") as img:
            assert img.size == (128, 64) and img.mode == "RGB"
        assert parameters(first_run / f"{k:05d}.png") == (
            f"a dog\nNegative prompt: blurry\n"
            f"Steps: 3, Sampler: DDIM, CFG scale: 7.5, Seed: {7 + k}, Size: 128x64, Model: tiny")
    with Image.open(first_run / "grid-0000.png") as grid:
        assert grid.size == (256, 64)
    assert pixels(first_run / "00000.png").std() > 1  # an image, not a flat colour
    assert not np.array_equal(pixels(first_run / "00000.png"), pixels(first_run / "00001.png"))


def test_one_image_and_a_runs_model(tmp_path):
    """One image writes no grid (it would be a copy of the image), and a run's model.safetensors is named in the
    metadata by its run folder."""
    import dreambooth

    (tmp_path / "dog-run").mkdir()
    dreambooth.save(dreambooth.load("tiny"), tmp_path / "dog-run" / "model.safetensors")
    sample.main(["--ckpt", str(tmp_path / "dog-run" / "model.safetensors"), "--ddim_steps", "2", "--prompt", "a dog",
                 "--outdir", str(tmp_path / "out")])
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["00000.png"]
    assert parameters(tmp_path / "out" / "00000.png").endswith("Model: dog-run")


def test_a_toy_model_is_sampled_with_the_toy_settings(tmp_path):
    """A file fine-tuned from the toy model (as the README's first command makes one) is sampled, where --scale and
    --ddim_steps are not given, with the settings the toy world is measured with (guidance 3, 25 steps): at SD's
    7.5, that model drew its pink ring purple. A model with SD's latent scale, here tiny, keeps SD's settings (the
    first test: 7.5)."""
    import dreambooth

    (tmp_path / "toy-run").mkdir()
    dreambooth.save(dreambooth.load("toy"), tmp_path / "toy-run" / "model.safetensors")  # keeps its latent scale
    sample.main(["--ckpt", str(tmp_path / "toy-run" / "model.safetensors"), "--prompt", "a sks circle",
                 "--outdir", str(tmp_path / "out")])
    assert parameters(tmp_path / "out" / "00000.png") == (
        "a sks circle\nSteps: 25, Sampler: DDIM, CFG scale: 3.0, Seed: 42, Size: 64x64, Model: toy-run")


def test_rerun_gives_identical_pngs_under_new_numbers(first_run, tmp_path):
    outdir = shutil.copytree(first_run, tmp_path / "samples")
    before = {p.name: p.read_bytes() for p in outdir.iterdir()}
    sample.main(FAST + ["--prompt", "a dog", "--negative-prompt", "blurry", "--H", "64", "--W", "128",
                        "--n_samples", "2", "--seed", "7", "--outdir", str(outdir)])
    assert sorted(p.name for p in outdir.iterdir()) == ["00000.png", "00001.png", "00002.png", "00003.png",
                                                        "grid-0000.png", "grid-0001.png"]
    assert {name: (outdir / name).read_bytes() for name in before} == before  # nothing overwritten
    assert (outdir / "00002.png").read_bytes() == before["00000.png"]
    assert (outdir / "00003.png").read_bytes() == before["00001.png"]


def test_one_image_of_a_batch_can_be_made_again_from_its_seed(first_run, tmp_path):
    sample.main(FAST + ["--prompt", "a dog", "--negative-prompt", "blurry", "--H", "64", "--W", "128",
                        "--seed", "8", "--skip_grid", "--outdir", str(tmp_path)])
    assert [p.name for p in tmp_path.iterdir()] == ["00000.png"]
    assert parameters(tmp_path / "00000.png") == parameters(first_run / "00001.png")
    # Alone instead of in a batch of two: equal up to rounding in the last bits of the arithmetic.
    assert np.abs(pixels(tmp_path / "00000.png") - pixels(first_run / "00001.png")).max() <= 2


def test_prompts_from_file_with_iterations_and_eta(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na bird\n")
    outdir = tmp_path / "out"
    sample.main(["--ckpt", "tiny", "--ddim-steps", "2", "--from-file", str(prompts), "--n-samples", "2",
                 "--n-iter", "2", "--ddim-eta", "1.0", "--scale", "3", "--H", "64", "--W", "64",
                 "--outdir", str(outdir)])
    expected = [("a cat", 42), ("a bird", 43), ("a cat", 44), ("a bird", 45)]
    for k, (prompt, seed) in enumerate(expected):
        assert parameters(outdir / f"{k:05d}.png") == (
            f"{prompt}\nSteps: 2, Sampler: DDIM, CFG scale: 3.0, Seed: {seed}, Size: 64x64, Model: tiny, Eta: 1.0")
    with Image.open(outdir / "grid-0000.png") as grid:
        assert grid.size == (128, 128)  # rows of --n_samples


@pytest.mark.parametrize("flags, message", [
    (["--prompt", "x", "--H", "100"], "argument --H: 100: must be a positive multiple of 8"),
    (["--prompt", "x", "--W", "0"], "argument --W: 0: must be a positive multiple of 8"),
    (["--prompt", "x", "--ckpt", "no/such/file.ckpt"], "--ckpt no/such/file.ckpt: no such file"),
    (["--from-file", "no/such/prompts.txt"], "--from-file no/such/prompts.txt: no such file"),
    ([], "one of the arguments --prompt --from-file/--from_file is required"),
    (["--prompt", "x", "--from-file", "p.txt"], "argument --from-file/--from_file: not allowed with argument --prompt"),
    (["--prompt", "x", "--ddim_steps", "0"], "argument --ddim_steps/--ddim-steps: 0: must be from 1 to 999"),
    (["--prompt", "x", "--ddim_steps", "1000"], "argument --ddim_steps/--ddim-steps: 1000: must be from 1 to 999"),
    (["--prompt", "x", "--n_samples", "0"], "argument --n_samples/--n-samples: 0: must be at least 1"),
    (["--prompt", "x", "--ddim_eta", "-1"], "argument --ddim_eta/--ddim-eta: -1: must be at least 0"),
    (["--prompt", "x", "--precision", "half"], "argument --precision: invalid choice"),
])
def test_bad_flags_are_refused_with_a_clear_message(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        sample.main(flags)
    assert e.value.code == 2
    assert f"sample.py: error: {message}" in capsys.readouterr().err


def test_empty_prompt_file_and_bad_checkpoint_are_refused(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(SystemExit):
        sample.main(["--from-file", str(tmp_path / "empty.txt")])
    assert f"--from-file {tmp_path / 'empty.txt'}: no prompts in it" in capsys.readouterr().err
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    with pytest.raises(SystemExit) as e:
        sample.main(["--prompt", "x", "--ckpt", str(tmp_path / "notes.ckpt"), "--outdir", str(tmp_path / "out")])
    assert str(e.value).startswith("sample.py: error: ") and "notes.ckpt" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_command_line_without_weights_uses_the_toy_model(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "sample.py"), "--prompt", "photo of a sks dog",
                             "--ddim_steps", "2", "--skip_grid"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("sample.py: note: no weights/sd-v1-4.ckpt or .safetensors")
    assert lines[-1] == "wrote 1 image: outputs/samples/00000.png"
    assert [p.name for p in (tmp_path / "outputs" / "samples").iterdir()] == ["00000.png"]
    assert "the built-in toy model" in lines[0]
    assert parameters(tmp_path / "outputs/samples/00000.png").endswith("Seed: 42, Size: 64x64, Model: toy")
