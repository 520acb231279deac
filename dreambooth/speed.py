"""What makes a training step fast in plain PyTorch, and small: two wrappers that the textbook step opts into, each
named for what it does, and the estimate of a run's memory by which train.py decides on gradient checkpointing.

    optimizer = StepInBackward(blocks(trained), make_adamw)   # optimizer.step() done inside loss.backward()
    step.learn = CUDAGraphReplay(step.learn, warmup=3)        # a whole step recorded once, then replayed

Both leave the step as the textbook writes it (loss.backward(); optimizer.step(); optimizer.zero_grad()), and both
compute what it computes: the weights come out the same (tests/test_train.py).
"""
import functools

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

    def __init__(self, blocks, make_optimizer):
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


class CUDAGraphReplay:
    """fn(*inputs) -> tensor, recorded once as a CUDA graph and replayed at every later call
    (https://pytorch.org/docs/stable/notes/cuda.html#cuda-graphs).

    Why: a training step of the SD UNet on a batch of two latents launches about 5,000 small kernels, and the GPU
    runs each faster than Python and PyTorch can launch the next, so it waits half the time (the step is
    launch-bound: a batch of 8 costs about what a batch of 2 costs). A CUDA graph records every kernel of one call,
    with its arguments and memory addresses, and replay() launches them all at once.

    What it asks: a replay reads and writes the memory of the recording, so each call copies its inputs into the
    recorded ones, and nothing inside fn may read a value on the host (hence AdamW's tensor learning rate and
    on-device step count). Randomness stays outside, in the inputs. The first `warmup` calls run eagerly on a side
    stream, as PyTorch's notes advise, so that lazy setup (AdamW's moments, cuDNN and cuBLAS workspaces) is done
    before the recording. If the recording fails, nothing of it has run: on_failure(why) is told, and fn runs
    eagerly from then on."""

    def __init__(self, fn, warmup=1, on_failure=None):
        self.fn, self.warmup, self.on_failure = fn, warmup, on_failure
        self.graph, self.failed = None, False

    def __call__(self, *inputs):
        if self.failed:
            return self.fn(*inputs)
        with torch.cuda.device(inputs[0].device):  # streams and the graph on the inputs' GPU, not the current one
            if self.graph is None and self.warmup:
                self.warmup -= 1
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    output = self.fn(*inputs)
                torch.cuda.current_stream().wait_stream(side)
                return output
            if self.graph is not None:
                for recorded, value in zip(self.inputs, inputs):
                    recorded.copy_(value)
            elif not self.record(inputs):
                return self.fn(*inputs)
            self.graph.replay()
            return self.output.clone()

    def record(self, inputs):
        """Record fn on the inputs; nothing runs. False if the recording failed, and fn runs eagerly from then on."""
        stream, self.inputs, self.graph = torch.cuda.current_stream(), inputs, torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.output = self.fn(*self.inputs)
            return True
        except RuntimeError as e:
            torch.cuda.set_stream(stream)  # a failed capture can leave its own stream current
            self.failed, self.graph, self.inputs = True, None, None  # and its memory pool goes with the graph
            torch.cuda.empty_cache()
            if self.on_failure:
                self.on_failure(str(e).splitlines()[0] if str(e) else type(e).__name__)
            return False


# ---- memory ---------------------------------------------------------------------------------------------------------

# Activation memory that backward keeps for one 512 px image (64x64 latents) in the full-size UNet under bf16
# autocast without gradient checkpointing, in GiB: a measured peak at batch 1+1, less the fp32 weights and AdamW
# moments, over 2 images (benchmarks/README.md, "Memory and optimizer choices").
ACTIVATIONS_GIB = 2.1


def training_memory_gib(unet, params, images_per_step, resolution, fp32, after_backward):
    """What a training run needs on the GPU beyond its weights, without gradient checkpointing, in GiB: the
    activations backward keeps (ACTIVATIONS_GIB scaled by latent pixels and UNet width, twice that in fp32), AdamW's
    two fp32 moments of `params` (made at the first step) and, stepping after backward, their whole fp32 gradient."""
    images = images_per_step * (resolution / 512) ** 2 * unet.config.model_channels / 320 * (2 if fp32 else 1)
    return ACTIVATIONS_GIB * images + sum(p.numel() for p in params) * (12 if after_backward else 8) / 2**30


def free_gpu_memory_gib(device):
    """Free GPU memory, counting what torch's caching allocator holds but does not use."""
    free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free / 2**30
