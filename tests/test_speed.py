"""dreambooth/speed.py beyond what test_train.py's runs show: the CUDA graph's streams, pools and failures (on the
CPU through tests/fake_cuda.py, and on a GPU for real), the memory estimate's figures, a resume that keeps the
optimizer's tensors, and TF32 in fp32."""
import copy
import warnings

import pytest
import torch

from dreambooth import speed
from dreambooth.clip import CLIPConfig, CLIPTextModel
from dreambooth.unet import UNetConfig, UNetModel
from dreambooth.vae import AutoencoderKL, VAEConfig
from tests.fake_cuda import FakeCUDA

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: a real CUDA graph")


@pytest.fixture
def fresh_process(monkeypatch):
    """As in a new process: no recording has failed yet (and whatever a test sets is undone)."""
    monkeypatch.setattr(speed, "recording_failed_before", None)


@pytest.fixture
def cuda(monkeypatch, fresh_process):
    return FakeCUDA(monkeypatch)


def double(x):
    return x * 2


# ---- the CUDA graph's logic, on the CPU ------------------------------------------------------------------------------

def test_a_failed_recording_runs_eagerly_and_no_later_graph_is_recorded(cuda):
    """A recording that fails says so once, runs fn eagerly from then on, never calls empty_cache (the allocator may
    still be in the capture), takes the allocator out of the capture, and lets go of the graph, its pool and its
    inputs. A later graph in the process (a preview's) then runs eagerly without trying to record."""
    lines, x = [], torch.arange(4.0)
    graph = speed.CUDAGraphReplay(double, warmup=1, on_failure=lines.append)
    cuda.fail = "operation not permitted when stream is capturing"
    for _ in range(4):
        assert torch.equal(graph(x), x * 2)
    assert lines == ["operation not permitted when stream is capturing"]
    recorded = [c for c in cuda.calls if c[0] == "record"]
    assert len(recorded) == 1 and "empty_cache" not in cuda.calls
    pool = recorded[0][2]
    assert ("end allocate to pool", 0, pool) in cuda.calls
    assert cuda.current is cuda.default  # the capture's stream is not left current
    assert graph.graph is graph.pool is graph.inputs is graph.output is None and graph.failed
    assert len(cuda.graphs) == 1 and cuda.graphs[0]() is None  # nothing holds the failed graph

    later_lines = []
    later = speed.CUDAGraphReplay(double, warmup=1, on_failure=later_lines.append)
    for _ in range(3):
        assert torch.equal(later(x), x * 2)
    assert len([c for c in cuda.calls if c[0] == "record"]) == 1  # no second recording
    assert later_lines == ["an earlier recording in this process failed (operation not permitted when stream is "
                           "capturing)"]
    assert "empty_cache" not in cuda.calls


def test_each_graph_warms_up_and_records_on_its_own_stream_with_a_fresh_pool(cuda):
    """One stream per graph, made once: all its warm-ups run there (so they reuse each other's memory) and it is
    recorded there; two graphs never share a stream or a pool. A stream given (generate()'s) is used as it is."""
    x = torch.ones(2)
    a, b = speed.CUDAGraphReplay(double, warmup=2), speed.CUDAGraphReplay(double, warmup=2)
    for _ in range(4):
        a(x)
        b(x)
    given = torch.cuda.Stream()
    c = speed.CUDAGraphReplay(double, warmup=1, stream=given)
    c(x), c(x)
    warm = [s for kind, s, *_ in cuda.calls if kind == "on stream"]
    recorded = [(s, pool) for kind, s, *pool in cuda.calls if kind == "record"]
    assert warm == [a.stream, b.stream, a.stream, b.stream, given]
    assert recorded == [(a.stream, [a.pool]), (b.stream, [b.pool]), (given, [c.pool])]
    assert len({a.stream, b.stream, given}) == 3 and len({a.pool, b.pool, c.pool}) == 3
    assert cuda.calls.count("replay") == 2 + 2 + 1  # a and b from their 3rd call on, c from its 2nd


def test_a_host_read_in_the_last_warmup_means_no_recording(cuda):
    """An operation that makes the host wait for the GPU (torch's sync debug mode warns of it) would spoil the
    recording: seen in the last warm-up, which runs whole, the graph is not recorded and fn runs eagerly. Other
    warnings pass through, and the debug mode is put back."""
    def reads_on_the_host(x):
        if torch.cuda.get_sync_debug_mode() == "warn":  # as torch warns of x.sum().item() on a GPU
            warnings.warn("called a synchronizing CUDA operation")
        warnings.warn("something else", UserWarning)
        return x * 3

    lines, x = [], torch.ones(2)
    graph = speed.CUDAGraphReplay(reads_on_the_host, warmup=2, on_failure=lines.append)
    with pytest.warns(UserWarning, match="something else"):
        outputs = [graph(x) for _ in range(4)]
    assert all(torch.equal(out, x * 3) for out in outputs)
    assert lines == ["it reads the GPU from the host: called a synchronizing CUDA operation"]
    assert not [c for c in cuda.calls if c[0] == "record"] and cuda.sync_debug_mode == "default"
    assert speed.recording_failed_before is None  # nothing was recorded: later graphs still can be


# ---- the memory estimate -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_size():
    """The full-size SD v1 networks on the meta device: their shapes and parameter counts, no memory."""
    with torch.device("meta"):
        return UNetModel(UNetConfig()), CLIPTextModel(CLIPConfig()), AutoencoderKL(VAEConfig())


def test_memory_estimate_figures(full_size):
    """The full-size UNet at 512 px, bf16, AdamW inside backward, batch 1 + 1: 1.60 GiB of weight casts (fixed),
    1.3 GiB per image, 6.40 GiB of AdamW moments; a preview adds CLIP's and the VAE's fp32 weights (0.77 GiB) and
    2.0 GiB of work, on top of the step beside a CUDA graph's pool, within the step's freed memory when eager."""
    unet, clip, vae = full_size
    params = list(unet.parameters())

    def need(images=2, **kw):
        kw = dict(resolution=512, fp32=False, after_backward=False, device=torch.device("cuda")) | kw
        return speed.training_memory_gib(unet, params, images, kw.pop("resolution"), kw.pop("fp32"),
                                         kw.pop("after_backward"), **kw)

    plain = need()
    assert plain.optimizer == pytest.approx(6.404, abs=1e-3)
    assert plain.step == pytest.approx(1.601 + 2 * 1.3, abs=1e-3)
    assert plain.preview == 0 and plain.total == pytest.approx(10.605, abs=1e-3)
    assert need(images=4).step - plain.step == pytest.approx(2 * 1.3)  # only the activations grow with the batch
    assert need(resolution=256).step == pytest.approx(1.601 + 2 * 1.3 / 4, abs=1e-3)
    assert need(fp32=True).step == pytest.approx(2 * 2 * 1.3)  # no casts, twice the activations
    assert need(after_backward=True).step - plain.step == pytest.approx(plain.optimizer / 2)  # the fp32 gradient

    graphed = need(graph=True, preview_modules=(clip, vae))
    assert graphed.preview == pytest.approx(0.770 + 2.0, abs=1e-3)
    assert graphed.total == pytest.approx(6.404 + 4.201 + 2.770, abs=1e-3)
    eager = need(graph=False, preview_modules=(clip, vae))
    assert eager.total == pytest.approx(plain.total)  # the preview fits in the step's freed memory
    on_the_gpu = need(graph=True, preview_modules=(clip, vae), device=torch.device("meta"))  # where they are
    assert on_the_gpu.preview == pytest.approx(2.0)  # weights already on the device are counted as held
    assert str(graphed) == "the step 4.2, AdamW 6.4, a preview 2.8 beside the CUDA graph's pool"


def test_memory_estimate_counts_no_casts_for_a_base_held_in_the_autocast_dtype(full_size):
    """LoRA's frozen base held in bf16 is used as it is: no casts; the adapters' AdamW state is all there is."""
    unet = full_size[0]
    with torch.device("meta"):
        bf16 = UNetModel(UNetConfig()).to(torch.bfloat16)
    adapters = [torch.nn.Parameter(torch.empty(6_800_000, device="meta"))]
    need = speed.training_memory_gib(bf16, adapters, 2, 512, False, True)
    assert need.step == pytest.approx(2 * 1.3 + 4 * 6.8e6 / 2**30)
    assert speed.training_memory_gib(unet, adapters, 2, 512, False, True).step - need.step == pytest.approx(1.601,
                                                                                                          abs=1e-3)


# ---- the optimizer -------------------------------------------------------------------------------------------------

def trained_optimizer(in_backward, seed):
    """Two steps of a small model: torch's AdamW stepped after backward, or speed.StepInBackward's one per block."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    lr = torch.tensor(1e-2)

    def adamw(params):
        return torch.optim.AdamW(params, lr=lr, fused=True)  # as train_setup makes it (capturable needs CUDA)

    optimizer = speed.StepInBackward(speed.blocks({"m": model}), adamw) if in_backward else adamw(model.parameters())
    for _ in range(2):
        model(torch.randn(4, 6)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer, lr


@pytest.mark.parametrize("in_backward", [False, True])
def test_resume_loads_into_the_optimizers_own_tensors(in_backward):
    """Loading a state (train_setup.load_optimizer_state, as --resume does) writes into the moment and step tensors
    that exist (a recorded graph reads them at their addresses) rather than replacing them, and the values are the
    loaded ones."""
    import train_setup

    (ours, lr), (theirs, _) = trained_optimizer(in_backward, 0), trained_optimizer(in_backward, 1)
    ours, saved = train_setup.torch_optimizers(ours), [o.state_dict() for o in train_setup.torch_optimizers(theirs)]

    def pointers():
        return [v.data_ptr() for o in ours for state in o.state.values() for v in state.values()]

    before = pointers()
    for optimizer, state in zip(ours, saved):
        train_setup.load_optimizer_state(optimizer, state, lr)
    assert pointers() == before and len(before) == 3 * 4  # step, exp_avg, exp_avg_sq of 4 weights
    for o, s in zip(ours, saved):
        for state, saved_state in zip(o.state.values(), s["state"].values()):
            assert all(torch.equal(state[k], saved_state[k].to(state[k].dtype)) for k in state)
        assert all(g["lr"] is lr for g in o.param_groups)


def test_tf32_only_for_fp32_on_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", calls.append)
    assert speed.tf32_matmuls(torch.device("cpu"), "fp32") is None
    assert speed.tf32_matmuls(torch.device("cuda"), "bf16") is None
    assert calls == []
    assert "TF32" in speed.tf32_matmuls(torch.device("cuda"), "fp32") and calls == ["high"]


# ---- on a GPU ------------------------------------------------------------------------------------------------------

@needs_cuda
def test_a_real_failed_recording_leaves_cuda_usable(fresh_process):
    """A capture spoiled by a host read (only while capturing, so that the warm-up's check does not catch it):
    one line, eager results, then empty_cache, a new graph's fallback and plain CUDA work all still run."""
    def spoiled(x):
        if torch.cuda.is_current_stream_capturing():
            x = x * x.sum().item() / x.sum().item()  # a host read: the capture is invalidated
        return x * 2

    lines, x = [], torch.arange(4.0, device="cuda")
    graph = speed.CUDAGraphReplay(spoiled, warmup=1, on_failure=lines.append)
    for _ in range(3):
        assert torch.equal(graph(x), x * 2)
    assert len(lines) == 1 and graph.failed
    torch.cuda.empty_cache()  # would fail an internal assert with the allocator left in the capture
    later = speed.CUDAGraphReplay(double, warmup=1)
    assert torch.equal(later(x), x * 2) and torch.equal(later(x), x * 2) and later.failed
    import dreambooth
    from dreambooth.generate import generate

    sd = dreambooth.load("tiny", device="cuda")  # a preview after the failure: generate() runs eagerly
    assert len(generate(sd, ["a dog"], [0], steps=3, progress=False)) == 1
    torch.cuda.synchronize()


@needs_cuda
def test_a_real_host_read_in_the_warmup_records_nothing(fresh_process):
    lines, x = [], torch.arange(4.0, device="cuda")
    graph = speed.CUDAGraphReplay(lambda x: x * x.sum().item(), warmup=1, on_failure=lines.append)
    for _ in range(3):
        assert torch.equal(graph(x), x * 6)
    assert len(lines) == 1 and "reads the GPU from the host" in lines[0] and graph.graph is None
    assert speed.recording_failed_before is None and torch.cuda.get_sync_debug_mode() == 0


@needs_cuda
def test_a_real_graph_replays_on_its_own_stream_and_resumes_into_its_tensors(fresh_process):
    """Two live graphs on their own streams replay correctly, and an optimizer state loaded after the recording
    is what the next replay reads."""
    import train_setup

    model = torch.nn.Linear(8, 8, device="cuda")
    lr = torch.tensor(1e-3, device="cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=True, capturable=True)
    saved = None

    def step(x):
        loss = model(x).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    graph, other = speed.CUDAGraphReplay(step, warmup=2), speed.CUDAGraphReplay(double, warmup=1)
    x = torch.randn(4, 8, device="cuda")
    for k in range(5):
        graph(x)
        assert torch.equal(other(x), x * 2)
        if k == 1:  # a copy: state_dict() hands out the live tensors
            saved = copy.deepcopy(optimizer.state_dict())
    assert graph.graph is not None and other.graph is not None and graph.stream != other.stream
    train_setup.load_optimizer_state(optimizer, saved, lr)  # after the recording: the replay reads the loaded step
    step_tensor = next(iter(optimizer.state.values()))["step"]
    before = step_tensor.item()
    graph(x)
    torch.cuda.synchronize()
    assert step_tensor.item() == before + 1


def test_setup_counts_a_preview_beside_the_graph_when_it_chooses_checkpointing(monkeypatch):
    """train_setup's choice on a GPU: with previews and the CUDA graph, their memory adds to the step's; the line says
    what it counted. (The CPU stands in for the GPU: only the free memory is made up.)"""
    import dreambooth
    import train_settings
    import train_setup

    sd = dreambooth.load("tiny")
    params = list(sd.unet.parameters())

    def choose(free, *flags):
        monkeypatch.setattr(speed, "free_gpu_memory_gib", lambda device: free)
        args, _ = train_settings.parse_args(["--instance", "x", "--class", "dog", "--resolution", "512", *flags])
        return train_setup.choose_grad_checkpointing(args, sd, params, 2, False, torch.device("cuda"))

    def need(graph):
        return speed.training_memory_gib(sd.unet, params, 2, 512, False, False, graph, (sd.text_encoder, sd.vae),
                                         torch.device("cuda"))

    graphed, eager = need(True), need(False)
    assert graphed.total > eager.total
    free = (graphed.total + eager.total) / 2 / 0.85  # enough for all but the graph's pool beside a preview
    on, line = choose(free)
    assert on and f"needs about {graphed.total:.1f} GiB more (the step" in line and "beside the CUDA graph" in line
    on, line = choose(free, "--sample-every", "0")
    assert not on and "preview" not in line
    on, line = choose(free, "--no-cuda-graph")
    assert not on and "a preview" in line and "beside" not in line
