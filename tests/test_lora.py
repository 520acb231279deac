"""LoRA (dreambooth/lora.py): the layer's arithmetic, kohya's file format as diffusers reads it, parity of sampling
with a LoRA against diffusers' StableDiffusionPipeline.load_lora_weights, and the one-line errors for files that are
not SD v1 LoRAs."""
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import dreambooth
import train
import train_setup
from dreambooth.generate import generate
from dreambooth.lora import LoRA, base_dtype, kohya_name, load_lora, save_lora, target_layers
from tests.conftest import run
from tests.references import assert_close, random_lora, reference_pipeline, single_file_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def diffusers_images(pipe, prompts, seeds, steps, side):
    """The pipeline's images from the initial latents our generate() draws for these seeds."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    latents = torch.stack([torch.randn(4, side // 8, side // 8, generator=g) for g in generators])
    return pipe(prompts, height=side, width=side, num_inference_steps=steps, guidance_scale=7.5,
                generator=generators, latents=latents, output_type="np").images


def lora_layers(pipe, adapter=None):
    """How many layers of diffusers' pipeline got a LoRA (the adapter of that name, or the first loaded)."""
    import peft

    modules = [*pipe.unet.modules(), *pipe.text_encoder.modules()]
    return sum(isinstance(m, peft.tuners.lora.LoraLayer) and (adapter or "default_0") in m.lora_A for m in modules)


@torch.no_grad()
def test_full_size_lora_matches_diffusers(sd_v1_files, tmp_path):
    """A LoRA file we write, loaded by diffusers' own load_lora_weights (kohya's format, converted by diffusers'
    code, every adapted layer found), gives the image sample.py --lora gives, from the same full-size base model."""
    pytest.importorskip("peft")
    sd = dreambooth.load(sd_v1_files.safetensors)
    path = tmp_path / "lora.safetensors"
    lora = random_lora(sd, path, std=0.05)
    pipe = reference_pipeline(sd)  # holds our tensors: built before load_lora changes them
    prompts, seeds, steps = ["photo of a sks dog"], [5], 4
    base = diffusers_images(pipe, prompts, seeds, steps, 64)
    pipe.load_lora_weights(str(path))
    assert lora_layers(pipe) == len(lora) == 16 * 12 + 12 * 6  # no key missing, none unexpected
    theirs = diffusers_images(pipe, prompts, seeds, steps, 64)
    load_lora(sd, path)
    ours = np.stack([np.asarray(image) / 255 for image in generate(sd, prompts, seeds, steps=steps, height=64, width=64,
                                                                       progress=False)])
    print("ours - theirs", np.abs(ours - theirs).max(), "base - theirs", np.abs(base - theirs).max())
    assert np.abs(ours - theirs).max() < 0.5 / 255 + 1e-4
    assert np.abs(base - theirs).max() > 0.1  # the LoRA changes the image: the test can fail


def test_full_size_training_writes_what_diffusers_loads(sd_v1_files, photos, tmp_path):
    """train.py --lora on the full-size model (at 64 px, 2 steps): diffusers' kohya loader finds a layer for every
    key of the file, UNet and text encoder."""
    pytest.importorskip("peft")
    out = tmp_path / "run"
    run(photos, out, "--ckpt", str(sd_v1_files.safetensors), "--steps", "2", "--lora", "4", "--train-text-encoder")
    pipe = reference_pipeline(dreambooth.load(sd_v1_files.safetensors))
    pipe.load_lora_weights(str(out / "lora.safetensors"), adapter_name="trained")
    assert lora_layers(pipe, "trained") == 16 * 12 + 12 * 6 == len(load_file(out / "lora.safetensors")) // 3


def test_our_layer_names_are_diffusers_modules():
    """kohya_name() maps each layer we adapt to the diffusers module of the same weight: every name, with its
    underscores read back as diffusers' dots, is a module of diffusers' own UNet or transformers' CLIP, of the same
    shape. (Checked on diffusers' models built from the tiny config, of one ResBlock per level where SD v1 has two:
    kohya_name numbers by num_res_blocks, and SD v1's numbering is checked at full size above)."""
    from tests.references import reference_clip, reference_unet

    sd = dreambooth.load("tiny")
    theirs = {"lora_unet_" + name.replace(".", "_"): m for name, m in reference_unet(sd.unet).named_modules()}
    clip = {name.removeprefix("text_model."): m for name, m in reference_clip(sd.text_encoder).named_modules()}
    theirs |= {"lora_te_text_model_" + name.replace(".", "_"): m for name, m in clip.items()}  # kohya's names keep
    # transformers 4's text_model. prefix, which transformers 5 dropped from the module tree
    layers = target_layers(sd)
    assert len(layers) == 10 * 12 + 2 * 6  # the tiny UNet's 10 transformers x 12 layers, 2 CLIP layers x 6
    for name, layer in layers.items():
        assert name in theirs, name
        assert theirs[name].weight.shape == layer.weight.shape, name
        assert torch.equal(theirs[name].weight, layer.weight), name  # the same weights: the same layer
    assert kohya_name("unet", "output_blocks.3.1.transformer_blocks.0.attn2.to_k") == \
        "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"


@torch.no_grad()
def test_new_lora_is_the_base_model_and_merging_is_the_same_forward(tmp_path):
    """up = 0 at the start: the adapted model computes exactly what the base model does. With trained (random) up,
    the hooked forward equals the forward of a model with the file merged in, the scale acts linearly, and
    LoRA.merged() gives back W0 exactly."""
    sd = dreambooth.load("tiny")
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500])
    context = sd.encode_text(["photo of a sks dog", ""])
    base = sd.unet(x, t, context)
    lora = LoRA(sd, 4, 2.0, text_encoder=True, seed=3).attach()
    assert torch.equal(sd.unet(x, t, context), base)
    assert torch.equal(sd.encode_text(["photo of a sks dog", ""]), context)
    generator = torch.Generator().manual_seed(4)
    for adapter in lora.values():  # values an fp16 file holds exactly
        adapter.lora_up.weight.copy_((0.2 * torch.randn(adapter.lora_up.weight.shape, generator=generator)).half())
        adapter.lora_down.weight.copy_(adapter.lora_down.weight.half())
    hooked = sd.unet(x, t, sd.encode_text(["photo of a sks dog", ""]))
    assert (hooked - base).abs().max() > 0.1
    w0 = {name: layer.weight.clone() for name, layer in lora.layers.items()}
    with lora.merged():
        assert any(not torch.equal(layer.weight, w0[name]) for name, layer in lora.layers.items())
    assert all(torch.equal(layer.weight, w0[name]) for name, layer in lora.layers.items())

    path = tmp_path / "lora.safetensors"
    save_lora(lora, path)
    merged = dreambooth.load("tiny")
    load_lora(merged, path)
    assert_close(merged.unet(x, t, merged.encode_text(["photo of a sks dog", ""])), hooked)
    twice, half = dreambooth.load("tiny"), dreambooth.load("tiny")
    load_lora(twice, path, scale=2.0)
    load_lora(half, path, scale=0.5)
    load_lora(half, path, scale=0.5)
    w0, w2, w_half = (dict(m.unet.named_parameters()) for m in (dreambooth.load("tiny"), twice, half))
    for name, w1 in merged.unet.named_parameters():  # W0 + s * delta, for s = 1, 2 and 0.5 + 0.5
        torch.testing.assert_close(w2[name] - w0[name], 2 * (w1 - w0[name]), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(w_half[name], w1, rtol=1e-5, atol=1e-6)


def test_training_writes_a_lora_diffusers_loads_and_resumes_exactly(photos, tmp_path):
    """train.py --lora: only the adapters train (the base stays the tiny model), the run writes lora.safetensors and
    no full model, diffusers' kohya loader finds a layer for every key, and a resumed run ends where a straight run
    does. --save-merged adds model.safetensors: the base with the LoRA merged in."""
    from safetensors import safe_open

    straight, out = tmp_path / "straight", tmp_path / "run"
    flags = ["--lora", "4", "--train-text-encoder", "--lr", "1e-2", "--batch-size", "2"]
    run(photos, straight, "--steps", "4", *flags, "--save-merged")
    run(photos, out, "--steps", "2", *flags)
    train.main(["--resume", str(out), "--steps", "4"])
    assert sorted(p.name for p in out.iterdir()) == [".lock", "log.jsonl", "lora.safetensors", "train_state.pt"]
    resumed, expected = load_file(out / "lora.safetensors"), load_file(straight / "lora.safetensors")
    assert resumed.keys() == expected.keys() and all(torch.equal(resumed[k], expected[k]) for k in expected)
    assert (out / "train_state.pt").stat().st_size < 5e6  # the adapters and their moments, not the model
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(out), "--steps", "5", "--lora", "8"])
    assert e.value.code == 2

    with safe_open(out / "lora.safetensors", framework="pt") as f:
        meta = f.metadata()
        assert {f.get_tensor(k).dtype for k in f.keys() if k.endswith(".weight")} == {torch.float16}
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4" and meta["ss_steps"] == "4"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_sd_model_name"] == "tiny"

    base = dreambooth.load("tiny")
    merged = dreambooth.load(straight / "model.safetensors")
    expected = dreambooth.load("tiny")
    load_lora(expected, straight / "lora.safetensors")
    for (name, w), w_expected, w0 in zip(merged.unet.named_parameters(), expected.unet.parameters(),
                                         base.unet.parameters()):
        torch.testing.assert_close(w, w_expected.half().float(), rtol=0, atol=1e-3, msg=name)
    assert not torch.equal(merged.unet.input_blocks[1][1].proj_in.weight, base.unet.input_blocks[1][1].proj_in.weight)

    dreambooth.save(base, tmp_path / "base.safetensors", dtype=torch.float32)
    pipe = single_file_pipeline(tmp_path / "base.safetensors", base, tmp_path / "config")
    pipe.load_lora_weights(str(out / "lora.safetensors"))
    assert lora_layers(pipe) == 10 * 12 + 2 * 6  # the tiny UNet's 10 transformers x 12 layers, 2 CLIP layers x 6


@pytest.mark.parametrize("device, precision, merged, dtype", [
    ("cuda", torch.bfloat16, False, torch.bfloat16), ("cuda", torch.float16, False, torch.float16),
    ("cuda", torch.float32, False, torch.float32), ("cuda", torch.bfloat16, True, torch.float16),
    ("cuda", torch.float16, True, torch.float16), ("cpu", torch.bfloat16, False, torch.float32)])
def test_the_frozen_base_is_held_in_the_autocast_dtype(device, precision, merged, dtype):
    """On a GPU, the dtype autocast computes in, so no weight is cast at each forward; fp16 where the merged model
    (an fp16 file) is saved; fp32 on the CPU and in fp32."""
    assert base_dtype(device, precision, merged) == dtype


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_make_step_holds_the_base_in_the_chosen_dtype_and_the_adapters_in_fp32(photos, monkeypatch, precision):
    """train.make_step with --lora: the UNet's and CLIP's own weights in the dtype base_dtype picks (here told to
    pick as on a GPU, which the CPU cannot show), the adapters in fp32, and a bf16 step trains the adapters."""
    from tests.test_train import make_step

    monkeypatch.setattr(train_setup, "lora_base_dtype", lambda device, dtype, merged: base_dtype("cuda", dtype, merged))
    sd, step = make_step(photos, "--lora", "4", "--precision", precision, "--train-text-encoder")
    expected = train_setup.PRECISIONS[precision]
    assert {p.dtype for m in (sd.unet, sd.text_encoder) for p in m.parameters()} == {expected}
    adapters = [p for g in step.optimizer.param_groups for p in g["params"]]
    assert {p.dtype for p in adapters} == {torch.float32}
    if precision == "bf16":  # CPU autocast runs bf16; fp16 kernels are patchy on CPUs
        before = [p.detach().clone() for p in adapters]
        losses = step(torch.Generator().manual_seed(0))
        assert losses.isfinite().all() and any(not torch.equal(a, b) for a, b in zip(adapters, before))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the base's dtype on a GPU")
def test_lora_on_cuda_in_bf16_holds_a_bf16_base_and_trains(photos, tmp_path, monkeypatch):
    """The whole run on a GPU with the bf16 base: the CUDA-graph step, a preview grid and the file."""
    dtypes, make_step = set(), train.make_step

    def spy(sd, *args):
        made = make_step(sd, *args)
        dtypes.update(p.dtype for m in (sd.unet, sd.text_encoder) for p in m.parameters())
        return made

    monkeypatch.setattr(train, "make_step", spy)
    run(photos, tmp_path / "run", "--device", "cuda", "--precision", "bf16", "--lora", "4", "--steps", "6",
        "--sample-every", "3")
    assert dtypes == {torch.bfloat16}
    assert (tmp_path / "run" / "lora.safetensors").exists() and len(list((tmp_path / "run" / "samples").iterdir())) == 2


def write(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path


@pytest.mark.parametrize("keys, message", [
    ({"model.diffusion_model.out.2.weight": (4, 4)}, r"is a model or VAE \(keys like model\.diffusion_model"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": (4, 4)}, "is a LyCORIS LoHa/LoKr file"),
    ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (4, 32)}, "is a LoRA for SDXL"),
    ({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": (4, 64)}, "is a LoRA for SDXL"),
    ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": (4, 32)}, r"unexpected key unet\.down_blocks"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": (4, 32, 3, 3),
      "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": (32, 4, 1, 1)}, r"conv1 adapts a convolution .*LoCon"),
    ({"lora_unet_down_blocks_0_attentions_0_norm.lora_down.weight": (4, 32),
      "lora_unet_down_blocks_0_attentions_0_norm.lora_up.weight": (32, 4)}, "_norm.lora_down.weight names no SD v1"),
    ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (4, 1024),
      "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": (32, 4)},
     r"attn2_to_k is for a layer of shape \[32, 1024\], SD v1's is \[32, 32\].*SD 2\.x"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 32, 1, 1)}, "proj_in has no lora_up"),
], ids=["full-model", "lycoris", "sdxl-te", "sdxl-unet", "peft", "locon", "unknown", "sd2", "half"])
def test_files_that_are_not_sd_v1_loras_are_named(tmp_path, keys, message):
    path = write(tmp_path / "other.safetensors", {k: torch.zeros(shape) for k, shape in keys.items()})
    before = dreambooth.load("tiny").unet.state_dict()
    sd = dreambooth.load("tiny")
    with pytest.raises(dreambooth.CheckpointError, match=f"^{tmp_path}/other.safetensors.*{message}"):
        load_lora(sd, path)
    assert all(torch.equal(v, before[k]) for k, v in sd.unet.state_dict().items())  # nothing half-applied


def test_sample_py_merges_loras_and_writes_them_into_png_info(tmp_path, capsys):
    import sample

    run_folder = tmp_path / "dog-run"
    run_folder.mkdir()
    random_lora(dreambooth.load("tiny"), run_folder / "lora.safetensors")
    flags = ["--ckpt", "tiny", "--ddim_steps", "3", "--prompt", "a sks dog", "--seed", "1"]
    sample.main(flags + ["--outdir", str(tmp_path / "base")])
    sample.main(flags + ["--lora", f"{run_folder / 'lora.safetensors'}:0.7", "--outdir", str(tmp_path / "lora")])
    with Image.open(tmp_path / "lora" / "00000.png") as image:
        assert image.text["parameters"].startswith("a sks dog <lora:dog-run:0.7>\n")
        pixels = np.asarray(image, np.int16)
    with Image.open(tmp_path / "base" / "00000.png") as image:
        assert np.abs(pixels - np.asarray(image, np.int16)).max() > 10
    with pytest.raises(SystemExit, match=r"^sample\.py: error: .*base\.safetensors is a model or VAE"):
        sample.main(flags + ["--lora", str(write(tmp_path / "base.safetensors", {"encoder.conv_in.weight":
                                                                                  torch.zeros(1)}))])
    with pytest.raises(SystemExit):
        sample.main(flags + ["--lora", str(tmp_path / "missing.safetensors")])
    assert "--lora " + str(tmp_path / "missing.safetensors") + ": no such file" in capsys.readouterr().err
