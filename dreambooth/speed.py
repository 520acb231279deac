"""What makes a training step fast in plain PyTorch, and small: two wrappers that the textbook step opts into, each
named for what it does, and the estimate of a run's memory by which train.py decides on gradient checkpointing.

    optimizer = StepInBackward(blocks(trained), make_adamw)   # optimizer.step() done inside loss.backward()
    step.learn = CUDAGraphReplay(step.learn, warmup=3)        # a whole step recorded once, then replayed

Both leave the step as the textbook writes it (loss.backward(); optimizer.step(); optimizer.zero_grad()), and both
compute what it computes: the weights come out the same (tests/test_train.py).
"""
import dataclasses
import functools
import warnings

import torch


def blocks(modules):
    """The trained parameters of {name: module} grouped by block, the unit StepInBackward steps: input_blocks.3,
    middle_block.1, output_blocks.11, time_embed.0 of the UNet; embeddings, encoder.layers.5 of CLIP."""
    groups = {}
    for module_name, module in modules.items():
        for name, param in module.named_parameters():
            parts = name.split(".")
            depth = next((i + 1 for i, part in enumerate(parts) if part.isdigit()), 1)  # up to the first index
            groups.setdefault((module_name, *parts[:depth]), []).append(param)
    return list(groups.values())


class StepInBackward:
    """An optimizer whose step happens inside loss.backward(): each block of parameters has its own optimizer
    (make_optimizer(params)), and a hook on each parameter counts the gradients backward has finished (PyTorch calls
    it once the gradient is accumulated). When the last one of a block is in, that block's optimizer steps and frees
    its gradients. So only a few blocks' gradients exist at any time instead of a full copy of the weights (3.4 GB
    for the SD UNet in fp32), and the weights come out the same as stepping after backward, because AdamW updates
    each parameter from its own gradient alone.

    It stands where the optimizer stands in the textbook step: loss.backward() steps, step() checks that every block
    did, zero_grad() has nothing left to free (after a backward that did not finish, it frees what is left)."""

    def __init__(self, blocks, make_optimizer, average=None):
        self.blocks, self.average = blocks, average  # average(gradients): torchrun's mean over ranks, before a step
        self.optimizers = [make_optimizer(params) for params in blocks]
        self.sizes = [len(params) for params in blocks]
        self.waiting = list(self.sizes)
        for i, params in enumerate(blocks):
            for param in params:
                param.register_post_accumulate_grad_hook(functools.partial(self.gradient_ready, i))

    @property
    def param_groups(self):
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def gradient_ready(self, i, param):
        self.waiting[i] -= 1
        if self.waiting[i] == 0:
            if self.average is not None:
                self.average([p.grad for p in self.blocks[i]])
            self.optimizers[i].step()
            self.optimizers[i].zero_grad(set_to_none=True)
            self.waiting[i] = self.sizes[i]

    def step(self):
        if self.waiting != self.sizes:  # a parameter that got no gradient would hold its block back
            raise RuntimeError("some trained parameters got no gradient; step the optimizer after backward instead")

    def zero_grad(self, set_to_none=True):
        if self.waiting != self.sizes:  # a backward that did not finish (a failed CUDA graph recording)
            for optimizer in self.optimizers:
                optimizer.zero_grad(set_to_none=True)
            self.waiting = list(self.sizes)


# Set when a recording failed after it began: the process's caching allocator may then still believe a capture is
# under way (a failed capture can leave it so, and any later capture's empty_cache would fail an internal assert),
# so no later graph (a preview's) is recorded in this process. Holds the failure, for the line saying so.
recording_failed_before = None


class CUDAGraphReplay:
    """fn(*inputs) -> tensor, recorded once as a CUDA graph and replayed at every later call
    (https://pytorch.org/docs/stable/notes/cuda.html#cuda-graphs).

    Why: a training step of the SD UNet on a batch of two latents launches about 5,000 small kernels, and the GPU
    runs each faster than Python and PyTorch can launch the next, so it waits half the time (the step is
    launch-bound: a batch of 8 costs about what a batch of 2 costs). A CUDA graph records every kernel of one call,
    with its arguments and memory addresses, and replay() launches them all at once.

    What it asks: a replay reads and writes the memory of the recording, so each call copies its inputs into the
    recorded ones, and nothing inside fn may read a value on the host (hence AdamW's tensor learning rate and
    on-device step count). Randomness stays outside, in the inputs. The first `warmup` calls run eagerly, as
    PyTorch's notes advise, so that lazy setup (AdamW's moments, cuDNN and cuBLAS workspaces) is done before the
    recording. They run on the graph's own stream, the one it is recorded on: warm-ups reuse each other's memory,
    the workspaces made per stream are made there, and no two live graphs share a stream (a graph destroyed on a
    shared stream can drop cuBLAS workspaces another graph still uses). Each recording has a fresh memory pool.

    If fn reads the GPU from the host in the last warm-up (torch's sync debug mode sees it), or the recording
    fails, on_failure(why) is told and fn runs eagerly from then on. A warm-up that saw a host read ran whole; a
    failed recording ran nothing. `stream`: the stream to use (generate() gives all its graphs one); default new."""

    def __init__(self, fn, warmup=1, on_failure=None, stream=None):
        self.fn, self.warmup, self.on_failure, self.stream = fn, warmup, on_failure, stream
        self.graph = self.pool = self.inputs = self.output = None
        self.failed = False

    def __call__(self, *inputs):
        if self.failed:
            return self.fn(*inputs)
        with torch.cuda.device(inputs[0].device):  # streams and the graph on the inputs' GPU, not the current one
            if self.graph is not None:
                for recorded, value in zip(self.inputs, inputs):
                    recorded.copy_(value)
            else:
                self.stream = self.stream or torch.cuda.Stream()
                if self.warmup:
                    return self.warm_up(inputs)
                if not self.record(inputs):
                    return self.fn(*inputs)
            self.graph.replay()
            return self.output.clone()

    def warm_up(self, inputs):
        """fn run eagerly on the graph's stream; in the last warm-up, a host read means no recording."""
        self.warmup -= 1
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            output, read = host_reads(self.fn, *inputs) if self.warmup == 0 else (self.fn(*inputs), None)
        torch.cuda.current_stream().wait_stream(self.stream)
        if read:
            self.give_up(f"it reads the GPU from the host: {read}")
        return output

    def record(self, inputs):
        """Record fn on the inputs; nothing runs. False if the recording failed, and fn runs eagerly from then on."""
        global recording_failed_before
        if recording_failed_before:
            return self.give_up(f"an earlier recording in this process failed ({recording_failed_before})")
        before, device = torch.cuda.current_stream(), torch.cuda.current_device()
        self.graph, self.pool, self.inputs = torch.cuda.CUDAGraph(), torch.cuda.graph_pool_handle(), inputs
        try:
            with torch.cuda.graph(self.graph, pool=self.pool, stream=self.stream):
                self.output = self.fn(*self.inputs)
            return True
        except RuntimeError as e:
            torch.cuda.set_stream(before)  # a failed capture can leave its own stream current
            pool = self.pool
            # The graph goes first, with what this torch's CUDAGraph frees of a failed capture; nothing may call
            # empty_cache (the allocator can still be in the capture) until end_capture_state() has run.
            self.graph = self.pool = self.inputs = self.output = None
            end_capture_state(device, pool)
            recording_failed_before = why = str(e).splitlines()[0] if str(e) else type(e).__name__
            return self.give_up(why)

    def give_up(self, why):
        self.failed, self.stream = True, None
        if self.on_failure:
            self.on_failure(why)
        return False


def end_capture_state(device, pool):
    """Take the caching allocator out of a capture that failed, if it is still in it (some torch versions leave it
    there: every later empty_cache then fails an assert, and freed memory is held back as if the capture ran on).
    torch has no public call for this; where the private one is missing or the capture was ended, nothing happens.
    The failed capture's pool is left to torch: releasing it here too could release it twice, which aborts."""
    end = getattr(torch._C, "_cuda_endAllocateToPool", None)
    if end is not None:
        try:
            end(device, pool)
        except RuntimeError:  # "not currently recording to mempool_id": this torch ended it already
            pass


def host_reads(fn, *inputs):
    """(fn(*inputs), the first operation in it that made the host wait for the GPU, or None), seen by torch's CUDA
    sync debug mode "warn": such an operation would spoil a recording. Other warnings pass through."""
    before = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            output = fn(*inputs)
        finally:
            torch.cuda.set_sync_debug_mode(before)
    seen = None
    for w in caught:
        if "synchronizing CUDA operation" in str(w.message):
            seen = seen or str(w.message).splitlines()[0]
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return output, seen


# ---- memory ---------------------------------------------------------------------------------------------------------
# What a run needs beyond the weights on the GPU when the free memory is measured (before the first step), without
# gradient checkpointing. Two figures are fixed per model, the rest grows with the images of a step. The figures for
# the full-size UNet come from a measured 13.8 GiB peak at batch 1+1, 512 px, bf16 autocast (9.6 GiB of it the fp32
# weights and AdamW's moments; benchmarks/README.md, "Memory and optimizer choices"); PREVIEW_WORK_GIB is an
# estimate from tensor sizes, not yet measured (benchmarks/gpu_check.py prints a run's measured peak, with and
# without previews, beside the estimate).

# Under bf16/fp16 autocast (without its cache, which a CUDA graph cannot keep) each forward casts every fp32 weight,
# and backward keeps each cast until it is done: 2 bytes per fp32 weight of the UNet, 1.6 GiB for the full-size one,
# whatever the batch. None in fp32, nor for weights held in the autocast dtype (LoRA's frozen base).
CAST_BYTES = 2

# The activations backward keeps per 512 px image in the full-size UNet (320 channels) under bf16 autocast, in GiB:
# (13.8 - 9.6 - 1.6 of casts) / 2 images. Scaled by latent pixels and UNet width, twice that in fp32.
ACTIVATIONS_GIB = 1.3

# A preview at 512 px beside the step (generate(), 5 prompts, classifier-free guidance): the pool of its CUDA graph
# (10 UNet rows at 64x64 latents, inference: about 0.7 GiB) and the VAE's decode of one image (the last up block at
# 512x512 with 128 channels, its group norms in fp32: about 0.8 GiB), rounded up; scaled by pixels. The CLIP and VAE
# weights it moves to the GPU are counted from their parameters.
PREVIEW_WORK_GIB = 2.0


@dataclasses.dataclass
class MemoryNeed:
    """A run's memory beyond what the GPU holds now, in GiB. `step`: what one step's forward and backward hold at
    their peak (weight casts, activations, the whole gradient when AdamW steps after backward), freed after each
    eager step, held for good in a CUDA graph's pool. `optimizer`: AdamW's two fp32 moments, made at the first step.
    `preview`: a preview grid's (0 without previews). Replayed from a CUDA graph, the step's pool stays reserved
    while a preview runs, so the two add up; eager, the preview reuses the step's freed memory."""
    step: float
    optimizer: float
    preview: float
    graph: bool

    @property
    def total(self):
        return self.optimizer + (self.step + self.preview if self.graph else max(self.step, self.preview))

    def __str__(self):
        beside = " beside the CUDA graph's pool" if self.graph else ""
        preview = f", a preview {self.preview:.1f}{beside}" if self.preview else ""
        return f"the step {self.step:.1f}, AdamW {self.optimizer:.1f}{preview}"


def training_memory_gib(unet, params, images_per_step, resolution, fp32, after_backward, graph=False,
                        preview_modules=None, device=None):
    """MemoryNeed of a training run without gradient checkpointing: the weight casts of `unet` (CAST_BYTES per fp32
    weight unless fp32), ACTIVATIONS_GIB per image of a step, AdamW's moments of `params` (8 bytes each), their
    whole fp32 gradient (4 more) stepping after backward, and with preview_modules (the text encoder and VAE a
    preview uses) a preview's: those of their weights that are not on the GPU now, and PREVIEW_WORK_GIB."""
    gib, pixels, trained = 2**30, (resolution / 512) ** 2, sum(p.numel() for p in params)
    casts = 0 if fp32 else sum(p.numel() for p in unet.parameters() if p.dtype == torch.float32) * CAST_BYTES / gib
    per_image = ACTIVATIONS_GIB * pixels * unet.config.model_channels / 320 * (2 if fp32 else 1)
    step = casts + per_image * images_per_step + (4 * trained / gib if after_backward else 0)
    preview = 0.0
    if preview_modules is not None:
        moved = sum(p.numel() * p.element_size() for m in preview_modules for p in m.parameters()
                    if p.device.type != device.type)  # one GPU: "cuda" and "cuda:0" are the same
        preview = moved / gib + PREVIEW_WORK_GIB * pixels
    return MemoryNeed(step, 8 * trained / gib, preview, graph)


def free_gpu_memory_gib(device):
    """Free GPU memory, counting what torch's caching allocator holds but does not use."""
    free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free / 2**30


def tf32_matmuls(device, precision):
    """--precision fp32 on CUDA: float32 matmuls on the tensor cores in TF32 (10-bit mantissa), as PyTorch already runs
    float32 convolutions; several times faster on Ampere and later. A line saying so, or None where nothing changes."""
    if device.type != "cuda" or precision != "fp32":
        return None
    torch.set_float32_matmul_precision("high")
    return "fp32: matmuls in TF32 on the tensor cores, as convolutions are (NVIDIA_TF32_OVERRIDE=0 turns both off)"
