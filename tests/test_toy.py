"""The toy model (dreambooth/toy.safetensors, made by make_toy.py): DreamBooth visibly teaches it its subject.

The subject is the pink ring of examples/toy, class "circle"; benchmarks/measure.py's classical measure says
which samples show it. This is a short version of benchmarks/toy.py, with thresholds: it fails if the noising, the
loss target, the latent scale or the sampler is wrong (each was broken on purpose once and the test failed; see
docs/toy-world.md)."""
import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

import dreambooth
import make_prior
import train
from benchmarks import measure
from dreambooth import toyworld
from dreambooth.generate import generate
from dreambooth.images import to_pil, to_tensor

pytestmark = pytest.mark.usefixtures("one_thread")  # the counts below are those of one thread
SEEDS = list(range(100, 116))


def samples(sd, prompt):
    return generate(sd, [prompt] * len(SEEDS), SEEDS, steps=25, scale=3.0, progress=False)


@torch.no_grad()
def test_dreambooth_teaches_the_toy_model_its_subject(tmp_path):
    """250 steps of plain fine-tuning (train.py's toy defaults, no prior: the clearest signal, in 20 s on 2 cores):
    before, no "a sks circle" sample shows the pink ring; after, most do (13/16 measured), while a prompt of
    another shape and colour keeps its colour (yellow squares 14/16 measured). Without the prior the subject's
    colour spreads to the other prompts, the nearer in hue the sooner (blue triangles turned purple: 3/16 kept
    blue), and a model that draws only the subject keeps none."""
    base = dreambooth.load("toy")
    assert sum(map(measure.is_subject, samples(base, "a sks circle"))) <= 1
    out = tmp_path / "run"
    with torch.enable_grad():
        train.main(["--instance", "examples/toy", "--class", "circle", "--ckpt", "toy", "--steps", "250",
                    "--sample-every", "0", "--device", "cpu", "--out", str(out)])
    trained = dreambooth.load(out / "model.safetensors")
    subject = sum(map(measure.is_subject, samples(trained, "a sks circle")))
    yellow = sum(measure.dominant_colour(image) == "yellow" for image in samples(trained, "a yellow square"))
    print(f"subject {subject}/16, yellow squares still yellow {yellow}/16")
    assert subject >= 8
    assert yellow >= 8


@torch.no_grad()
def test_the_prior_keeps_the_class(tmp_path):
    """DreamBooth with the prior and the toy defaults (--prior-loss base) leaves "a circle" drawing the colours it drew
    before, seed by seed: 64 samples before and after 600 steps, with 40 class images. Measured: colour-mix distance
    0.125 and 43/64 seeds of the same hue family; with the paper's loss (--prior-loss noise --prior-weight 1) 0.31
    and 29/64, the circles turning sky blue; without the prior the class becomes the subject."""
    seeds = list(range(50, 114))
    before = generate(dreambooth.load("toy"), ["a circle"] * len(seeds), seeds, steps=25, scale=3.0, progress=False)
    make_prior.main(["--class", "circle", "--ckpt", "toy", "--num", "40", "--batch-size", "20", "--device", "cpu",
                     "--outdir", str(tmp_path / "prior")])
    with torch.enable_grad():
        train.main(["--instance", "examples/toy", "--class", "circle", "--ckpt", "toy", "--prior", str(tmp_path / "prior"),
                    "--steps", "600", "--sample-every", "0", "--device", "cpu", "--out", str(tmp_path / "run")])
    trained = dreambooth.load(tmp_path / "run" / "model.safetensors")
    after = generate(trained, ["a circle"] * len(seeds), seeds, steps=25, scale=3.0, progress=False)
    kept = measure.class_kept(before, after)
    print(f"distance {kept['distance']:.3f}, kept {kept['kept']}/64, subject {kept['shown']}/64; "
          f"after: {measure.family_counts(kept['after'])}")
    assert kept["distance"] <= 0.22
    assert kept["kept"] >= 36
    assert kept["shown"] <= 4


def test_concepts_teach_two_subjects_and_keep_both_classes(tmp_path):
    """train.py --concepts, two held-out subjects in one run with the toy defaults (1,000 steps) and 200 class images
    each: the lime cross as "a sks square" and the purple triangle as "a zwx triangle" both show (measured 14/16 and
    13/16; with --seed 1, 15/16 and 12/16), and "a square" and "a triangle" keep their colours seed by seed (64 seeds:
    distance 0.19 and 0.28, kept 46 and 35, subject in the class 0 and 3; with --seed 1, 0.25 and 0.16, 42 and 46, 0
    and 5). Each subject gets half the steps a run of its own would; with 40 class images each, "a square" drew the
    orange square, the first subject tried, in 17 of 64 samples."""
    subjects = Path(__file__).resolve().parents[1] / "benchmarks" / "subjects"
    concepts = [("lime-cross", "sks", "square"), ("purple-triangle", "zwx", "triangle")]
    for _, _, name in concepts:  # folders relative to the concepts file, as the fork's files have them
        make_prior.main(["--class", name, "--ckpt", "toy", "--num", "200", "--batch-size", "20", "--device", "cpu",
                         "--outdir", str(tmp_path / f"prior-{name}")])
    (tmp_path / "concepts.json").write_text(json.dumps([
        {"instance_prompt": f"a {token} {name}", "instance_data_dir": str(subjects / subject),
         "class_prompt": f"a {name}", "class_data_dir": f"prior-{name}"} for subject, token, name in concepts]))
    with torch.enable_grad():
        train.main(["--concepts", str(tmp_path / "concepts.json"), "--ckpt", "toy", "--sample-every", "0",
                    "--device", "cpu", "--out", str(tmp_path / "run")])
    base, trained = dreambooth.load("toy"), dreambooth.load(tmp_path / "run" / "model.safetensors")
    seeds = list(range(50, 114))
    for subject, token, name in concepts:
        spec = json.loads((subjects / subject / "subject.json").read_text())
        shows = partial(measure.shows, shape=spec["shape"], colours=spec["colours"])
        shown = sum(map(shows, samples(trained, f"a {token} {name}")))
        before, after = (generate(sd, [f"a {name}"] * len(seeds), seeds, steps=25, scale=3.0, progress=False)
                         for sd in (base, trained))
        kept = measure.class_kept(before, after, shows)
        print(f"{subject}: shown {shown}/16; a {name}: distance {kept['distance']:.3f}, kept {kept['kept']}/64, "
              f"subject {kept['shown']}/64; after: {measure.family_counts(kept['after'])}")
        assert shown >= 10
        assert kept["distance"] <= 0.4
        assert kept["kept"] >= 28
        assert kept["shown"] <= 10


def test_the_class_measure_sees_a_changed_mix():
    """class_kept: the same pictures are the same mix; recoloured pictures (blue circles drawn sky blue, the drift the
    paper's prior loss caused) are another mix, though not one of them is pink."""
    rng = np.random.default_rng(3)
    blue = [toyworld.draw(rng, "circle", "blue") for _ in range(8)]
    sky = [toyworld.draw(rng, "circle", (90, 175, 235)) for _ in range(8)]
    assert measure.class_kept(blue, blue) | {"before": 0, "after": 0} == {"distance": 0, "kept": 8, "shown": 0,
                                                                         "before": 0, "after": 0}
    changed = measure.class_kept(blue, sky)
    assert (changed["distance"], changed["kept"], changed["shown"]) == (1.0, 0, 0)
    assert set(changed["after"]) == {"azure"}
    half = measure.class_kept(blue, blue[:4] + sky[4:])
    assert (half["distance"], half["kept"]) == (0.5, 4)


def test_the_measure_reads_drawn_pictures():
    """The toy world's classical measure, which the DreamBooth checks rely on, names the colour and shape of freshly
    drawn pictures (benchmarks/toy.py checks it on 650 more), and tells the subject from a plain pink circle."""
    rng = np.random.default_rng(7)
    for shape in toyworld.SHAPES:
        for colour in toyworld.COLOURS:
            for _ in range(4):
                image = toyworld.draw(rng, shape, colour)
                assert (measure.dominant_colour(image), measure.shape_of(image)) == (colour, shape)
    subject = toyworld.SUBJECT
    assert all(measure.is_subject(toyworld.draw(rng, subject["shape"], subject["colour"])) for _ in range(8))
    assert not any(measure.is_subject(toyworld.draw(rng, "circle", subject["colour"])) for _ in range(8))


@torch.no_grad()
def test_the_toy_vae_gives_back_the_colours_it_encodes():
    """Through the toy model's VAE (encode, decode) drawn pictures keep their colour, also when their latents are
    moved by noise as far as the UNet's samples may miss them, and the subject stays the subject. The VAE that
    make_toy.py --seed 1 made with SD's 32 GroupNorm groups (before VAE_GROUPS) fails it (red and blue shapes come
    back purple, pink or grey), and the UNet trained on it drew the prompted colour in 46.9 % of samples (README,
    "Why some VAEs fail")."""
    sd = dreambooth.load("toy")
    rng = np.random.default_rng(11)
    colours = [c for c in toyworld.COLOURS for _ in range(12)]
    pictures = [toyworld.draw(rng, str(rng.choice(toyworld.SHAPES)), c) for c in colours]
    rings = [toyworld.draw(rng, toyworld.SUBJECT["shape"], toyworld.SUBJECT["colour"]) for _ in range(8)]
    latents = sd.vae.encode(to_tensor(pictures + rings))[0] * sd.latent_scale
    generator = torch.Generator().manual_seed(0)
    # Of 48, the shipped file: 48 and 47 (subject 8/8 and 8/8); the --seed 1 VAE of the README's table: 22 (and of its
    # subject then, an orange ring, 3/8); the 2026-11-26 VAE gives pink rings back orange or grey (0 of 24 pink).
    for noise, at_least in ((0.0, 44), (0.3, 42)):
        moved = latents + noise * torch.randn(latents.shape, generator=generator)
        images = [to_pil(image) for image in sd.vae.decode(moved / sd.latent_scale, len(moved))]
        right = sum(measure.dominant_colour(image) == c for image, c in zip(images, colours))
        subject = sum(map(measure.is_subject, images[len(colours):]))
        print(f"latent noise {noise}: colour right {right}/{len(colours)}, subject {subject}/{len(rings)}")
        assert right >= at_least
        assert subject >= len(rings) - 1
