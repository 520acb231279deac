"""make_prior.py end to end on the built-in tiny model: files, manifest, resuming to an identical set, bad flags."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import make_prior

pytestmark = pytest.mark.usefixtures("one_thread")  # results compared bit for bit

REPO = Path(__file__).resolve().parents[1]
# 5 images in batches of 2: batches {0, 1}, {2, 3}, {4}.
FLAGS = ["--class", "dog", "--num", "5", "--batch-size", "2", "--ddim_steps", "2", "--H", "64", "--W", "64",
         "--ckpt", "tiny", "--seed", "100"]


def contents(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run."""
    outdir = tmp_path_factory.mktemp("prior") / "dog"
    make_prior.main(FLAGS + ["--outdir", str(outdir)])
    return outdir


def test_writes_images_and_manifest(reference):
    names = [f"{i:05d}.png" for i in range(5)]
    assert sorted(p.name for p in reference.iterdir()) == names + ["manifest.jsonl"]
    records = [json.loads(line) for line in (reference / "manifest.jsonl").read_text().splitlines()]
    assert records == [{"file": name, "prompt": "photo of a dog", "seed": 100 + i, "steps": 2, "scale": 10.0,
                        "eta": 0.0, "checkpoint": "tiny", "height": 64, "width": 64} for i, name in enumerate(names)]
    with Image.open(reference / "00003.png") as img:
        assert img.size == (64, 64)
        assert img.text["parameters"] == (
            "photo of a dog\nSteps: 2, Sampler: DDIM, CFG scale: 10.0, Seed: 103, Size: 64x64, Model: tiny")


def test_without_a_terminal_progress_is_plain_lines(tmp_path, capsys):
    """Output to a file (nohup, a CI log) gets no progress bar but a line for each tenth of the images."""
    make_prior.main(FLAGS[:FLAGS.index("--num")] + ["--num", "20"] + FLAGS[FLAGS.index("--num") + 2:]
                    + ["--outdir", str(tmp_path / "dog")])
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line.startswith("prior: ")] == [f"prior: {n}/20 images" for n in range(2, 21, 2)]


def test_resume_after_interruption_gives_the_same_set(reference, tmp_path, monkeypatch):
    outdir = tmp_path / "dog"
    saved, write_atomic = [], make_prior.write_atomic

    def write_then_stop(path, write):
        if path.suffix == ".png":
            if len(saved) == 3:  # Ctrl-C in the middle of the second batch: 00003.png is not written
                raise KeyboardInterrupt
            saved.append(path)
        write_atomic(path, write)

    monkeypatch.setattr(make_prior, "write_atomic", write_then_stop)
    with pytest.raises(SystemExit) as stopped:
        make_prior.main(FLAGS + ["--outdir", str(outdir)])
    assert stopped.value.code == 130  # interrupted, as shells expect for SIGINT
    assert sorted(p.name for p in outdir.iterdir()) == ["00000.png", "00001.png", "00002.png", "manifest.jsonl"]
    monkeypatch.undo()
    make_prior.main(FLAGS + ["--outdir", str(outdir)])
    assert contents(outdir) == contents(reference)


def test_images_without_a_finished_manifest_line_are_made_again(reference, tmp_path):
    outdir = shutil.copytree(reference, tmp_path / "dog")
    lines = (outdir / "manifest.jsonl").read_text().splitlines(keepends=True)
    # The run "died" after writing 00003.png (whole: PNGs are written atomically) but before its manifest line was
    # complete, and before 00004.png was started.
    (outdir / "manifest.jsonl").write_text("".join(lines[:3]) + lines[3][:20])
    (outdir / "00004.png").unlink()
    make_prior.main(FLAGS + ["--outdir", str(outdir)])
    assert contents(outdir) == contents(reference)


def test_a_finished_set_is_left_alone_and_can_grow(reference, tmp_path, monkeypatch):
    outdir = shutil.copytree(reference, tmp_path / "dog")
    monkeypatch.setattr(make_prior, "generate", lambda *a, **k: pytest.fail("generated a finished image again"))
    make_prior.main(FLAGS + ["--outdir", str(outdir)])
    assert contents(outdir) == contents(reference)
    monkeypatch.undo()
    make_prior.main([f if f != "5" else "6" for f in FLAGS] + ["--outdir", str(outdir)])
    assert sorted(p.name for p in outdir.iterdir())[-2:] == ["00005.png", "manifest.jsonl"]
    assert json.loads((outdir / "manifest.jsonl").read_text().splitlines()[-1])["seed"] == 105


def test_several_prompts_take_turns(reference, tmp_path):
    """--prompt repeated: image i is made from the (i mod n)-th prompt, which its manifest line and PNG info record."""
    outdir = tmp_path / "dogs"
    make_prior.main(FLAGS + ["--prompt", "photo of a dog", "--prompt", "a red dog", "--outdir", str(outdir)])
    records = [json.loads(line) for line in (outdir / "manifest.jsonl").read_text().splitlines()]
    assert [(r["file"], r["prompt"], r["seed"]) for r in records] == [
        (f"{i:05d}.png", ["photo of a dog", "a red dog"][i % 2], 100 + i) for i in range(5)]
    with Image.open(outdir / "00003.png") as img:
        assert img.text["parameters"].startswith("a red dog\nSteps: 2,")
    assert (outdir / "00003.png").read_bytes() != (reference / "00003.png").read_bytes()


@pytest.mark.parametrize("change, message", [
    (["--prompt", "a dog"], "prompt 'photo of a dog', not 'a dog'"),
    (["--prompt", "photo of a dog", "--prompt", "a dog"], "prompt 'photo of a dog', not 'a dog'"),  # image 1
    (["--scale", "7.5"], "scale 10.0, not 7.5"),
    (["--seed", "1"], "seed 100, not 1"),
    (["--H", "128"], "height 64, not 128"),
])
def test_refuses_to_mix_settings_in_one_folder(reference, tmp_path, change, message):
    outdir = shutil.copytree(reference, tmp_path / "dog")
    with pytest.raises(SystemExit) as e:
        make_prior.main(FLAGS + change + ["--outdir", str(outdir)])
    assert str(e.value) == (f"make_prior.py: error: {outdir} holds images made with {message}; "
                            "choose another --outdir or empty the folder")
    assert contents(outdir) == contents(reference)


@pytest.mark.parametrize("flags, message", [
    ([], "--class NAME is required"),
    (["--class", "dog", "--H", "100"], "argument --H: 100: must be a positive multiple of 8"),
    (["--class", "dog", "--num", "0"], "argument --num/--num-class-images/--num_class_images: 0: must be at least 1"),
    (["--class", "dog", "--batch-size", "0"], "argument --batch-size/--batch_size: 0: must be at least 1"),
    (["--class", "dog", "--ckpt", "missing.safetensors"], "--ckpt missing.safetensors: no such file"),
])
def test_bad_flags_are_refused_with_a_clear_message(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        make_prior.main(flags)
    assert e.value.code == 2
    assert f"make_prior.py: error: {message}" in capsys.readouterr().err


def test_command_line_defaults_to_prior_class_folder(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "make_prior.py"), "--class", "cat", "--num", "2",
                             "--ddim-steps", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("make_prior.py: note: no weights/sd-v1-4.ckpt or .safetensors")
    assert "the built-in toy model" in result.stdout.splitlines()[0]
    # The toy model's prompts: no "photo of", and the class in each of its colours, image i taking the (i mod 5)-th
    assert ("2 class images of 'a cat' / 'a red cat' / 'a green cat' / 'a blue cat' / 'a yellow cat' in prior/cat/"
            in result.stdout.splitlines()[-1])
    assert sorted(p.name for p in (tmp_path / "prior" / "cat").iterdir()) == ["00000.png", "00001.png",
                                                                              "manifest.jsonl"]
    records = [json.loads(line) for line in (tmp_path / "prior" / "cat" / "manifest.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["a cat", "a red cat"]


def test_a_lora_is_merged_recorded_and_not_mixed(reference, tmp_path):
    """--lora FILE:SCALE changes the class images, the manifest and PNG info record it, and a folder made without
    it is not continued with it."""
    import dreambooth
    from tests.references import random_lora

    lora = tmp_path / "style.safetensors"
    random_lora(dreambooth.load("tiny"), lora)
    outdir = tmp_path / "dog"
    make_prior.main(FLAGS + ["--lora", f"{lora}:0.5", "--outdir", str(outdir)])
    record = json.loads((outdir / "manifest.jsonl").read_text().splitlines()[0])
    assert record["lora"] == [["style.safetensors", 0.5]]
    with Image.open(outdir / "00000.png") as image:
        assert image.text["parameters"].startswith("photo of a dog <lora:style:0.5>\n")
    assert (outdir / "00000.png").read_bytes() != (reference / "00000.png").read_bytes()
    mixed = shutil.copytree(reference, tmp_path / "mixed")
    with pytest.raises(SystemExit, match="holds images made with lora None, not"):
        make_prior.main(FLAGS + ["--lora", f"{lora}:0.5", "--outdir", str(mixed)])
