"""CLIP text encoder parity: ours == transformers.CLIPTextModel carrying the same weights."""
import pytest
import torch
from transformers import CLIPTextConfig
from transformers import CLIPTextModel as HFCLIPTextModel

from dreambooth.clip import IGNORED_KEYS, CLIPConfig, CLIPTextModel
from dreambooth.tokenizer import Tokenizer

PROMPTS = [
    "a photo of sks dog",
    "",
    "portrait of a sks dog wearing a red hat, oil painting, highly detailed, trending on artstation",
]


def hf_config(cfg: CLIPConfig) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_width,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, max_position_embeddings=cfg.max_length,
        hidden_act="quick_gelu", layer_norm_eps=1e-5,
        pad_token_id=1, bos_token_id=0, eos_token_id=2,  # as in SD v1-4's text_encoder/config.json
        attn_implementation="eager",  # explicit softmax + mask: independent of our SDPA call
    )


@torch.no_grad()
def reference_and_ours(cfg: CLIPConfig, seed: int = 0):
    """A seeded random transformers model, and ours loaded with its weights through the checkpoint names."""
    torch.manual_seed(seed)
    ref = HFCLIPTextModel(hf_config(cfg)).eval()
    for p in ref.parameters():  # noise everywhere, so layer norms and biases are not the identity/zero
        p.add_(0.02 * torch.randn_like(p))
    state = {k.removeprefix("text_model."): v for k, v in ref.state_dict().items()}
    state = {k: v for k, v in state.items() if k not in IGNORED_KEYS}
    ours = CLIPTextModel(cfg).eval()
    ours.load_state_dict(state)  # strict
    return ref, ours


@pytest.fixture(scope="module")
def full_size():
    return reference_and_ours(CLIPConfig())


@pytest.fixture(scope="module")
def tiny():
    return reference_and_ours(CLIPConfig.tiny(), seed=1)


def assert_close(ours: torch.Tensor, ref: torch.Tensor):
    tol = 1e-5 * max(1.0, ref.abs().max().item())
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= tol


@torch.no_grad()
def test_full_size_matches_transformers(full_size):
    ref, ours = full_size
    ids = Tokenizer()(PROMPTS)
    out = ours(ids)
    assert out.shape == (3, 77, 768) and out.dtype == torch.float32
    assert_close(out, ref(input_ids=ids).last_hidden_state)


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
    assert_close(ours(ids), ref(input_ids=ids).last_hidden_state)
    short = ids[:, :10]  # fewer than 77 positions: same causal prefix
    assert_close(ours(short), ref(input_ids=short).last_hidden_state)


def test_bad_ids_shape_is_an_error(tiny):
    with pytest.raises(ValueError, match=r"\[B, <=77\]"):
        tiny[1](torch.zeros(2, 78, dtype=torch.long))


def test_missing_key_is_named():
    model = CLIPTextModel(CLIPConfig.tiny())
    state = model.state_dict()
    del state["encoder.layers.1.mlp.fc1.weight"]
    with pytest.raises(RuntimeError, match="encoder.layers.1.mlp.fc1.weight"):
        model.load_state_dict(state)


def test_wrong_shape_is_named():
    model = CLIPTextModel(CLIPConfig.tiny())
    state = model.state_dict()
    state["encoder.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 31)
    with pytest.raises(RuntimeError, match="encoder.layers.0.self_attn.k_proj.weight"):
        model.load_state_dict(state)


def test_position_ids_must_be_dropped_before_loading():
    model = CLIPTextModel(CLIPConfig.tiny())
    state = model.state_dict() | {"embeddings.position_ids": torch.arange(77)[None]}
    with pytest.raises(RuntimeError, match="embeddings.position_ids"):
        model.load_state_dict(state)
