"""Several subjects in one run (train.py --concepts FILE) and a caption per image (a .txt beside it), on the tiny
model: which prompt each image trains with, which class images each subject photo brings, the run's files, and
the one-line errors for bad concept files and captions."""
import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import train
import train_settings
import train_setup
from tests.conftest import run

pytestmark = pytest.mark.usefixtures("one_thread")  # results compared bit for bit
CPU = torch.device("cpu")


def write_concepts(path, concepts):
    path.write_text(json.dumps(concepts))
    return path


def two_concepts(photos, tmp_path):
    """A dog (2 photos; 3 class images, one with its own prompt in make_prior.py's manifest) and a cat (1 photo, 1
    class image), the folders given relative to the file."""
    for folder in ("instance", "prior", "one", "few_prior"):
        shutil.copytree(photos / folder, tmp_path / "data" / folder)
    return write_concepts(tmp_path / "concepts.json", [
        {"instance_prompt": "photo of a sks dog", "class_prompt": "photo of a dog",
         "instance_data_dir": "data/instance", "class_data_dir": "data/prior"},
        {"instance_prompt": "photo of a zwx cat", "class_prompt": "photo of a cat", "instance_data_dir": "data/one",
         "class_data_dir": "data/few_prior"}])


def setup_step(*argv):
    args, _ = train_settings.parse_args(["--ckpt", "tiny", "--device", "cpu", "--resolution", "64", *argv])
    train_settings.resolve_defaults(args)
    sd, images, photos = train_setup.load_model_and_photos(args, train_settings.run_concepts(args), CPU)
    step, _ = train.make_step(sd, images, photos, args, CPU)
    return step, photos


def test_each_subject_photo_brings_a_class_image_of_its_own_concept(photos, tmp_path):
    """Subject photos are drawn from both concepts, each with its own prompt, and beside each one in the batch a class
    image of the same concept, with that concept's class prompt (or the prompt the manifest lists for it)."""
    step, taken = setup_step("--concepts", str(two_concepts(photos, tmp_path)), "--batch-size", "4")
    assert taken.prompts == ["photo of a sks dog"] * 2 + ["photo of a zwx cat"] + \
        ["a dog, from make_prior", "photo of a dog", "photo of a dog", "photo of a cat"]
    assert taken.concepts == [0, 0, 1, 0, 0, 0, 1] and taken.n_instance == 3
    prompts = list(dict.fromkeys(taken.prompts))
    class_of = {"photo of a sks dog": {"a dog, from make_prior", "photo of a dog"},
                "photo of a zwx cat": {"photo of a cat"}}
    seen = set()
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        rows = step.batches.draw(generator)[3].tolist()
        for subject, prior in zip(rows[:4], rows[4:]):
            assert prompts[prior] in class_of[prompts[subject]]
            seen.add((prompts[subject], prompts[prior]))
    assert len(seen) == 3  # both subjects drawn, the dog with both of its class prompts


def test_a_one_concept_file_is_the_flags(photos, tmp_path):
    """A concepts file that says what --instance, --prior and their prompts say trains the same weights, bit for
    bit. (--prior-prompt's default is the first prompt of the folder's manifest.)"""
    concepts = write_concepts(tmp_path / "one.json", [
        {"instance_prompt": "photo of a sks dog", "class_prompt": "a dog, from make_prior",
         "instance_data_dir": str(photos / "instance"), "class_data_dir": str(photos / "prior")}])
    flags = ["--ckpt", "tiny", "--device", "cpu", "--resolution", "64", "--sample-every", "0", "--steps", "3",
             "--batch-size", "2", "--lr", "1e-3"]
    run(photos, tmp_path / "flags", *flags)
    train.main(["--concepts", str(concepts), "--out", str(tmp_path / "file"), *flags])
    a, b = (torch.load(tmp_path / run_ / "train_state.pt", weights_only=True)["weights"]["unet"]
            for run_ in ("flags", "file"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_concepts_run_previews_a_row_per_concept_and_resumes(photos, tmp_path):
    concepts = two_concepts(photos, tmp_path)
    out = tmp_path / "run"
    argv = ["--concepts", str(concepts), "--ckpt", "tiny", "--device", "cpu", "--resolution", "64", "--steps", "2",
            "--sample-every", "2", "--sample-steps", "2", "--batch-size", "2", "--out", str(out)]
    train.main(argv)
    with Image.open(out / "samples" / "step-00002.png") as grid:
        assert grid.width == 5 * 64 and grid.height == 2 * 64  # subject, 3 edits, class; a row per concept
    train.main(["--resume", str(out), "--steps", "3"])
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 3


@pytest.mark.parametrize("concepts, message", [
    ("not json", r"not a JSON file \(Expecting value: line 1"),
    ({"instance_prompt": "a"}, r"must hold a JSON list of concepts"),
    ([{"instance_prompt": "photo of a sks dog", "instance_data_dir": "data/instance"}],
     r"concept 1: class_prompt: missing"),
    ([{"instance_prompt": "photo of a sks dog", "instance_data_dir": "data/instance", "class_prompt": "a dog",
       "instance_dir": "x"}], r"concept 1: instance_dir: not a field of a concept \(instance_prompt, "),
    ([{"instance_prompt": "photo of a sks dog", "instance_data_dir": "data/instance", "class_prompt": 3}],
     r"concept 1: class_prompt: 3 is not a text"),
    ([{"instance_prompt": "photo of a sks dog", "instance_data_dir": "data/instance", "class_prompt": "a dog",
       "class_data_dir": "data/prior"},
      {"instance_prompt": "photo of a zwx cat", "instance_data_dir": "data/one", "class_prompt": "a cat"}],
     r"concept 2: class_data_dir: missing, while other concepts have one"),
    ([{"instance_prompt": "photo of a sks dog", "instance_data_dir": "data/instance", "class_prompt": "a dog"},
      {"instance_prompt": "photo of a zwx cat", "instance_data_dir": "data/nowhere", "class_prompt": "a cat"}],
     r"concept 2: instance_data_dir: .*data/nowhere: no such folder"),
])
def test_bad_concepts_files_are_named(photos, tmp_path, concepts, message):
    two_concepts(photos, tmp_path)  # the folders
    path = tmp_path / "concepts.json"
    path.write_text(concepts if isinstance(concepts, str) else json.dumps(concepts))
    with pytest.raises(SystemExit, match=rf"^train\.py: error: --concepts .*concepts\.json: {message}"):
        train.main(["--concepts", str(path), "--ckpt", "tiny", "--device", "cpu", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_concepts_take_no_single_subject_flags(photos, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_settings.parse_args(["--concepts", str(two_concepts(photos, tmp_path)), "--prior", "x"])
    assert e.value.code == 2 and "--prior: not with --concepts" in capsys.readouterr().err


def test_a_caption_beside_an_image_is_its_prompt(photos, tmp_path):
    """00.txt beside 00.png: the photo trains with its caption; a class image's caption comes before its manifest
    prompt; --no-captions trains every image with its folder's prompt."""
    instance, prior = (shutil.copytree(photos / f, tmp_path / f) for f in ("instance", "prior"))
    (instance / "00.txt").write_text("photo of a sks dog\non the grass\n")
    (prior / "00.txt").write_text("photo of a dog asleep")
    flags = ["--instance", str(instance), "--prior", str(prior), "--class", "dog"]
    _, taken = setup_step(*flags)
    from_make_prior = "a dog, from make_prior"  # the manifest lists 00.png; --prior-prompt is its first prompt
    assert taken.prompts == ["photo of a sks dog on the grass", "photo of a sks dog", "photo of a dog asleep",
                             from_make_prior, from_make_prior]
    _, taken = setup_step(*flags, "--no-captions")
    assert taken.prompts == ["photo of a sks dog"] * 2 + [from_make_prior] * 3


@pytest.mark.parametrize("folder, caption, message", [
    ("instance", "a dog on the grass",
     r"00\.txt: the caption 'a dog on the grass' does not name the subject \('sks'\)"),
    ("prior", "a sks dog", r"00\.txt: a class image's caption names the subject \('sks'\)"),
    ("instance", " \n", r"00\.txt: the caption is empty"),
])
def test_captions_that_would_teach_the_wrong_thing_are_named(photos, tmp_path, folder, caption, message):
    for f in ("instance", "prior"):
        shutil.copytree(photos / f, tmp_path / f)
    (tmp_path / folder / "00.txt").write_text(caption)
    with pytest.raises(SystemExit, match=rf"^train\.py: error: {tmp_path / folder}/{message}"):
        run(tmp_path, tmp_path / "run")
    run(tmp_path, tmp_path / "run", "--no-captions", "--steps", "1")  # the user's way out


def test_a_concepts_run_trains_a_lora_whose_file_names_them(photos, tmp_path):
    out = tmp_path / "run"
    train.main(["--concepts", str(two_concepts(photos, tmp_path)), "--ckpt", "tiny", "--device", "cpu", "--resolution",
                "64", "--steps", "2", "--sample-every", "0", "--lora", "4", "--out", str(out)])
    with safe_open(out / "lora.safetensors", "pt") as f:
        assert f.metadata()["ss_training_comment"].startswith("DreamBooth: the concepts of concepts.json")
        assert any(f.get_tensor(k).abs().sum() > 0 for k in f.keys() if k.endswith("lora_up.weight"))


def test_a_run_saved_before_captions_resumes_without_them(photos, tmp_path):
    """A train state whose settings have no "captions" (written before captions existed) resumes with the prompts it
    trained with, though a caption now lies beside a photo."""
    instance = shutil.copytree(photos / "instance", tmp_path / "instance")
    out = tmp_path / "run"
    run(photos, out, "--steps", "1")
    state = torch.load(out / "train_state.pt", weights_only=True)
    del state["args"]["captions"]
    state["args"]["instance"] = str(instance)
    torch.save(state, out / "train_state.pt")
    (instance / "00.txt").write_text("a caption without the token")
    assert not train_settings.parse_args(["--resume", str(out)])[0].captions
    train.main(["--resume", str(out), "--steps", "2"])
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 2


def test_a_trained_text_encoder_encodes_the_rows_prompts_where_captions_outnumber_them(photos, tmp_path):
    """With a caption per image there are more prompts than rows in a step: the trained text encoder then encodes
    each row's own prompt (2 here), not every caption of the run (5), and the step still trains it."""
    instance, prior = (shutil.copytree(photos / f, tmp_path / f) for f in ("instance", "prior"))
    for k in range(2):
        (instance / f"{k:02d}.txt").write_text(f"photo of a sks dog, number {k}")
    for k in range(3):
        (prior / f"{k:02d}.txt").write_text(f"photo of a dog, number {k}")
    step, taken = setup_step("--instance", str(instance), "--prior", str(prior), "--class", "dog",
                             "--train-text-encoder", "--lr", "1e-3")
    assert len(step.ids) == 5
    seen = []
    step.text_encoder.register_forward_hook(lambda module, inputs, output: seen.append(len(inputs[0])))
    before = step.text_encoder.state_dict()["encoder.layers.0.mlp.fc1.weight"].clone()
    assert step(torch.Generator().manual_seed(0)).isfinite().all()
    assert seen == [2]
    assert not torch.equal(step.text_encoder.state_dict()["encoder.layers.0.mlp.fc1.weight"], before)
