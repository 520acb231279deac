"""CLIP text encoder parity: ours == transformers.CLIPTextModel holding the same weights, loaded strictly through
diffusers' LDM converter from our state dict under 'cond_stage_model.transformer.text_model.'; and dreambooth.load
giving each CLIP tensor of a file to the module of that name."""
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import dreambooth
from dreambooth.checkpoint import CLIP, CheckpointError
from dreambooth.clip import IGNORED_KEYS, CLIPConfig, CLIPTextModel
from dreambooth.tokenizer import Tokenizer
from tests.references import assert_close, random_model, random_weights_, reference_clip

pytest.importorskip("transformers")

PROMPTS = [
    "a photo of sks dog",
    "",
    "portrait of a sks dog wearing a red hat, oil painting, highly detailed, trending on artstation",
]


def reference_and_ours(cfg: CLIPConfig, seed: int = 0):
    """Ours with seeded random weights, and transformers' with eager attention (an explicit softmax and mask,
    independent of our SDPA call) holding the same tensors."""
    ours = random_model(CLIPTextModel, cfg, seed=seed).eval()
    return reference_clip(ours, attention="eager"), ours


@pytest.fixture(scope="module")
def full_size():
    return reference_and_ours(CLIPConfig())


@pytest.fixture(scope="module")
def tiny():
    return reference_and_ours(CLIPConfig.tiny(), seed=1)


@torch.no_grad()
def test_full_size_matches_transformers(full_size):
    ref, ours = full_size
    ids = Tokenizer()(PROMPTS)
    out = ours(ids)
    assert out.shape == (3, 77, 768) and out.dtype == torch.float32
    assert_close(out, ref(input_ids=ids).last_hidden_state, rel=1e-5)


def test_keys_are_the_checkpoint_names(full_size):
    ref, ours = full_size
    keys = set(ours.state_dict())
    assert keys == {k.removeprefix("text_model.") for k in ref.state_dict()} - set(IGNORED_KEYS)
    assert {"embeddings.token_embedding.weight", "encoder.layers.11.self_attn.q_proj.weight",
            "encoder.layers.0.mlp.fc1.bias", "final_layer_norm.weight"} <= keys
    assert not keys & set(IGNORED_KEYS)
    assert sum(p.numel() for p in ours.parameters()) == 123_060_480  # ViT-L/14 text tower


@torch.no_grad()
def test_tiny_matches_transformers(tiny):
    ref, ours = tiny
    assert ours.config == CLIPConfig(width=32, layers=2, heads=2, mlp_width=64)
    ids = torch.randint(0, 49408, (3, 77), generator=torch.Generator().manual_seed(0))
    assert_close(ours(ids), ref(input_ids=ids).last_hidden_state, rel=1e-5)
    short = ids[:, :10]  # fewer than 77 positions: same causal prefix
    assert_close(ours(short), ref(input_ids=short).last_hidden_state, rel=1e-5)


def test_bad_ids_shape_is_an_error(tiny):
    with pytest.raises(ValueError, match=r"\[B, <=77\]"):
        tiny[1](torch.zeros(2, 78, dtype=torch.long))


# ---- dreambooth.load: the file's CLIP tensors, key by key ----------------------------------------------------

@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    """The tiny model with seeded noise in every CLIP tensor (no two alike, so a tensor under the wrong name
    shows), saved in fp32, plus the position_ids buffer that sd-v1-4.ckpt carries under the CLIP prefix."""
    sd = dreambooth.load("tiny")
    random_weights_(sd.text_encoder, seed=2)
    path = tmp_path_factory.mktemp("clip") / "tiny.safetensors"
    dreambooth.save(sd, path, dtype=torch.float32)
    save_file(load_file(path) | {CLIP + "embeddings.position_ids": torch.arange(77)[None]}, path)
    return path


def test_load_gives_each_clip_tensor_of_the_file_to_its_module(tiny_file):
    loaded = dreambooth.load(tiny_file).text_encoder.state_dict()
    in_file = {k.removeprefix(CLIP): v for k, v in load_file(tiny_file).items() if k.startswith(CLIP)}
    assert set(loaded) == set(in_file) - set(IGNORED_KEYS)
    for key, tensor in loaded.items():
        assert torch.equal(tensor, in_file[key]), key


@pytest.mark.parametrize("key, change, message", [
    ("encoder.layers.1.mlp.fc1.weight", None, "missing key {}$"),
    ("encoder.layers.0.self_attn.k_proj.weight", torch.zeros(32, 31), r"{} has shape \[32, 31\], expected \[32, 32\]$"),
])
def test_clip_key_problems_in_a_file_are_named(tiny_file, tmp_path, key, change, message):
    state = {k: v for k, v in load_file(tiny_file).items() if k != CLIP + key}
    if change is not None:
        state[CLIP + key] = change
    path = tmp_path / "broken.safetensors"
    save_file(state, path)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: " + message.format(re.escape(CLIP + key))):
        dreambooth.load(path)
