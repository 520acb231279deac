"""What train.py calls to set up a run, to save and resume it, and to draw its preview grids, each a small function:
the model and the photos, what trains (the UNet and CLIP, or LoRA adapters), the prompts' contexts, the frozen base
of --prior-loss base, the optimizer (stepped inside backward where that pays) with gradient checkpointing and the
CUDA graph decided, the run folder's files, and the grids of the loop's previews. model.safetensors is the fp16
model for users (sample.py, A1111, ComfyUI, diffusers); train_state.pt holds everything else needed to continue
exactly: the fp32 weights being trained (continuing from the fp16 copy would round them), the optimizer states,
the step, the data generator's state and the settings.
"""
import copy
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

import cli
import dreambooth
import manifest
from dreambooth import speed
from dreambooth.files import replace_all, why_write_failed, write_atomic
from dreambooth.generate import generate
from dreambooth.images import (a1111_parameters, image_grid, list_images, load_images, save_png,
                               skipped_images)
from dreambooth.lora import LoRA, base_dtype as lora_base_dtype, kohya_metadata, save_lora
from dreambooth.torchfile import first_line
from train_settings import words

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # --precision


def autocast(args):
    """The --precision of the networks: bf16/fp16 autocast keeps the fp32 weights and casts them where it pays.
    Without its cache of those casts: a CUDA graph cannot keep it, and each weight is used once per forward anyway."""
    return torch.autocast(torch.device(args.device).type, dtype=PRECISIONS[args.precision],
                          enabled=args.precision != "fp32", cache_enabled=False)


@dataclass
class Photos:
    """The run's images, as the rows of the tensor load_model_and_photos returns: every concept's subject photos, then
    every concept's class images; each with the prompt it trains with and the concept it belongs to."""
    prompts: list[str]
    concepts: list[int]  # 0, 1, ...: the concept of each row, counted as listed
    n_instance: int      # rows [0, n_instance) are subject photos


def load_model_and_photos(args, concepts, device):
    """Returns (sd, images [N, 3, R, R], Photos). Fills in what the model decides: --resolution and --sample-steps.
    The folders are checked before the model loads, so mistakes show in seconds; bad input (a folder, an image, a
    caption, a checkpoint) stops the run with one line naming it."""
    if not concepts[0].class_data_dir:
        print(f"warning: no {'class_data_dir' if args.concepts else '--prior'}: plain fine-tuning without prior "
              "preservation; the class may drift to the subject")
    try:
        subject = [photo for k, c in enumerate(concepts) for photo in concept_photos(args, k, c, subject=True)]
        counts = [sum(concept == k for *_, concept in subject) for k in range(len(concepts))]
        prior = [photo for k, c in enumerate(concepts)
                 for photo in concept_photos(args, k, c, subject=False, at_least=counts[k])]
        sd = cli.load_checkpoint("train.py", args.ckpt, device=device, dtype=torch.float32, ema=args.ema)  # fp32
        args.resolution = args.resolution or sd.resolution
        args.sample_steps = args.sample_steps or sd.sampling.get("ddim_steps", cli.SD_DDIM_STEPS)
        images, notes = load_images([path for path, _, _ in subject + prior], args.resolution)
    except ValueError as e:
        raise SystemExit(f"train.py: error: {e}") from None
    for note in notes:
        print(f"note: {note}")
    _, prompts, concept_of = zip(*subject, *prior)
    return sd, images, Photos(list(prompts), list(concept_of), len(subject))


def concept_photos(args, k, concept, subject, at_least=0):
    """[(path, prompt, k)] of concept k's subject photos or class images (at_least of them: one class image for each
    subject photo). An image's prompt is its caption (with --captions, caption_of), else the one make_prior.py's
    manifest lists for it, else its folder's prompt."""
    folder = concept.instance_data_dir if subject else concept.class_data_dir
    if not folder:
        return []
    which = f"--concepts {args.concepts}: concept {k + 1}: " if args.concepts else ""
    try:
        paths = list_images(folder)
        if len(paths) < at_least:
            what = f"--class {args.class_name}" if args.class_name and not args.concepts else \
                f'--prompt "{concept.class_prompt}"'
            raise ValueError(f"{folder}: {len(paths)} images, fewer than the {at_least} subject photos; make more "
                             f"with: python make_prior.py {what} --outdir {folder}")
    except ValueError as e:
        flag = f"{'instance' if subject else 'class'}_data_dir" if args.concepts else \
            "--instance" if subject else "--prior"
        raise ValueError(f"{which}{flag} {e}") from None
    try:
        captions = {path: caption_of(path, concept, subject) for path in paths} if args.captions else {}
    except ValueError as e:
        raise ValueError(f"{which}{e}") from None
    for path in skipped_images(folder):
        print(f"note: {path}: skipped; photos are read as JPEG, PNG, WebP or BMP only")
    listed = {} if subject else manifest.prompts(folder)
    folder_prompt = concept.instance_prompt if subject else concept.class_prompt
    return [(path, captions.get(path) or listed.get(path.name, folder_prompt), k) for path in paths]


def caption_of(path, concept, subject):
    """The caption of an image: the text of the .txt file of its name beside it (kohya's convention), or None. A
    subject photo's caption must name the subject's token (Concept.token_words: "sks"), which the photo teaches; a
    class image's must not, or the class images would teach the token the class."""
    text_file = path.with_suffix(".txt")
    if not text_file.is_file():
        return None
    try:
        caption = " ".join(text_file.read_bytes().decode().split())
    except UnicodeDecodeError as e:
        raise ValueError(f"{text_file}: a caption must be UTF-8 text ({e})") from None
    if not caption:
        raise ValueError(f"{text_file}: the caption is empty; write the image's prompt in it, or delete it")
    token = concept.token_words()
    named = " ".join(sorted(token))
    if subject and not token <= words(caption):
        raise ValueError(f"{text_file}: the caption {caption!r} does not name the subject ({named!r}), so the photo "
                         "would teach its other words the subject; add it, or train with --no-captions")
    if not subject and token & words(caption):
        raise ValueError(f"{text_file}: a class image's caption names the subject ({named!r}), which would teach it "
                         "the class; remove it")
    return caption


def trained_modules(sd, args, device):
    """{name: module} of what trains, in train mode with gradients; the rest frozen. With --lora only the adapters
    train: the base weights are frozen and held in the autocast dtype on a GPU (lora.base_dtype)."""
    if args.lora:
        trained = {"lora": LoRA(sd, args.lora, args.lora_alpha, args.train_text_encoder, args.seed).attach()}
        dtype = lora_base_dtype(device.type, PRECISIONS[args.precision], args.save_merged)
        sd.unet.to(dtype)
        sd.text_encoder.to(dtype)
    else:
        trained = {"unet": sd.unet} | ({"text_encoder": sd.text_encoder} if args.train_text_encoder else {})
    sd.vae.requires_grad_(False).eval()
    sd.unet.requires_grad_(not args.lora).train()
    sd.text_encoder.requires_grad_(args.train_text_encoder and not args.lora).train(args.train_text_encoder)
    return trained


def encode_prompts(sd, args, photos, base_prior, device):
    """The prompts a step uses, each once, in the order of the photos (the instance prompt first), and with --prior-loss
    base the empty prompt last. Returns (ids [K, 77], their contexts before training or None, each photo's row of
    them); a frozen text encoder then leaves the GPU."""
    prompts = list(dict.fromkeys(photos.prompts))
    cli.note_long_prompts(sd.tokenizer, prompts)
    ids = sd.tokenizer(prompts + [""] * base_prior).to(device)
    rows = torch.tensor([prompts.index(p) for p in photos.prompts], dtype=torch.long, device=device)
    contexts = None
    if not args.train_text_encoder or base_prior:  # the contexts before training: the base model's
        with torch.no_grad():
            contexts = sd.text_encoder(ids)
    if not args.train_text_encoder:
        sd.text_encoder.to("cpu")
    return ids, contexts, rows


def frozen_base(unet, lora, precision):
    """The base UNet for --prior-loss base, frozen: with --lora the UNet itself with its adapters off (its weights are
    the base's), else a copy taken before training, held in the autocast dtype (the dtype its forward runs in)."""
    if lora is not None:
        return lora.off(unet)
    return copy.deepcopy(unet).requires_grad_(False).eval().to(PRECISIONS[precision])


def make_optimizer(args, sd, trained, images_per_step, device, group=None):
    """AdamW over the trained weights, stepped inside backward where that pays (speed.StepInBackward), gradient
    checkpointing where memory needs it, and whether the step can be one CUDA graph; the choices in two lines.
    Under torchrun (group) each block's gradients are averaged over the ranks before the block steps.
    Returns (optimizer, lr, scaler, graph)."""
    params = [p for m in trained.values() for p in m.parameters()]
    # The textbook way, one AdamW stepped after backward, where stepping inside it cannot be or does not pay: clipping
    # the gradient norm needs the whole gradient first, fp16's loss scaling may skip a whole step, and LoRA's small
    # adapters need no saving of a gradient buffer: one AdamW for all of them launches fewer kernels than one per
    # adapter, and ran faster (benchmarks/README.md).
    after_backward = bool(args.lora or args.no_step_in_backward or args.clip_grad or args.precision == "fp16")
    checkpointing, why = choose_grad_checkpointing(args, sd, params, images_per_step, after_backward, device, group)
    sd.unet.set_grad_checkpointing(checkpointing)
    why_eager = why_no_cuda_graph(args, device, group)
    graph = why_eager is None
    # torch's AdamW with weight decay 0.01 (its default, as in the original DreamBooth fine-tuning), fused: one kernel
    # per update. Its learning rate is one tensor on the device, so that setting it is one write which a CUDA graph's
    # recorded update reads; `capturable` keeps its step count on the device too, so that nothing in an update reads
    # a value on the host.
    lr = torch.tensor(args.lr, dtype=torch.float32, device=device)

    def adamw(params):
        return torch.optim.AdamW(params, lr=lr, fused=True, capturable=graph)

    optimizer = adamw(params) if after_backward else \
        speed.StepInBackward(speed.blocks(trained), adamw, average=group.average if group else None)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    if tf32 := speed.tf32_matmuls(device, args.precision):
        print(tf32)
    print(f"{why}\nstep: {'one CUDA graph, recorded after 3 eager steps' if graph else f'eager ({why_eager})'}; "
          f"optimizer stepped {'after' if after_backward else 'inside'} backward")
    return optimizer, lr, scaler, graph


def why_no_cuda_graph(args, device, group=None):
    """Why the step cannot be one CUDA graph here (a line), or None where it can."""
    if device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if not args.cuda_graph:
        return "--no-cuda-graph"
    if group is not None:
        return "torchrun: the all-reduce of the gradients between processes is not recorded in the graph"
    if args.precision == "fp16":
        return "fp16's loss scaler checks the gradients on the host and may skip a step; bf16 runs as one CUDA graph"
    if args.clip_grad:
        return "--clip-grad is not recorded in the graph; without it the step runs as one CUDA graph"
    return None


def choose_grad_checkpointing(args, sd, params, images_per_step, after_backward, device, group=None):
    """Gradient checkpointing keeps only each UNet block's input in forward and recomputes the block in backward:
    a fraction of the activation memory, for more time per step. --grad-checkpointing / --no-grad-checkpointing
    decide; by default it is on only where the GPU could not hold the run without it.
    Returns (on, one line saying which and why)."""
    if args.grad_checkpointing is not None:
        return args.grad_checkpointing, f"gradient checkpointing {'on' if args.grad_checkpointing else 'off'} (asked)"
    if device.type != "cuda":
        return False, "gradient checkpointing off: memory is not the limit on a CPU (--grad-checkpointing turns it on)"
    need = speed.training_memory_gib(sd.unet, params, images_per_step, args.resolution, args.precision == "fp32",
                                     after_backward, why_no_cuda_graph(args, device, group) is None,
                                     (sd.text_encoder, sd.vae) if args.sample_every else None, device)
    free = speed.free_gpu_memory_gib(device)
    on = need.total > 0.85 * free
    return on, (f"gradient checkpointing {'on' if on else 'off'}: without it the run needs about {need.total:.1f} GiB "
                f"more ({need}) and {free:.1f} GiB of GPU memory are free "
                f"(--{'no-' if on else ''}grad-checkpointing forces it)")


def torch_optimizers(optimizer):
    """The torch optimizers behind a run's optimizer: the AdamW itself, or StepInBackward's one per block."""
    return optimizer.optimizers if isinstance(optimizer, speed.StepInBackward) else [optimizer]


def resume(args, state, trained, train_step, generator):
    """The trained weights, the optimizer and the data generator where the run stopped; returns its step."""
    try:
        for name, weights in state["weights"].items():
            trained[name].load_state_dict(weights)
        generator.set_state(state["data_rng"])  # nothing else draws: the networks have no dropout
        optimizers, saved = torch_optimizers(train_step.optimizer), list(state["optimizers"])
    except (KeyError, RuntimeError, TypeError) as e:
        raise SystemExit(f"train.py: error: --resume {args.resume}: train_state.pt does not fit this run "
                         f"({first_line(e)})") from None
    try:
        if len(saved) != len(optimizers):  # one AdamW per block, or one for all
            raise ValueError(f"it holds {len(saved)} optimizer states, not {len(optimizers)}")
        for optimizer, its_state in zip(optimizers, saved):
            load_optimizer_state(optimizer, its_state, train_step.lr)
        train_step.scaler.load_state_dict(state.get("scaler", {}))
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"train.py: error: --resume {args.resume}: {first_line(e)}; keep the run's --precision, "
                         "--clip-grad and --no-step-in-backward, which decide whether the optimizer steps inside "
                         "backward") from None
    return state["step"]


def load_optimizer_state(optimizer, state, lr):
    """A torch optimizer's saved state, with this run's learning-rate tensor and CUDA-graph setting. A recorded CUDA
    graph reads and writes the moment and step tensors that exist now, at their addresses: loaded values are copied
    into those, and only tensors that do not exist yet are new, in the memory layout of their weights, which fused
    AdamW needs (saved on the CPU in NCHW, resumed on CUDA in channels_last)."""
    capturable = optimizer.param_groups[0]["capturable"]
    existing = {param: dict(moments) for param, moments in optimizer.state.items()}
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:  # loading replaced these with the saved run's
        group["lr"], group["capturable"] = lr, capturable
    for param, moments in optimizer.state.items():
        for key, value in moments.items():
            if isinstance(old := existing.get(param, {}).get(key), torch.Tensor) and old.shape == value.shape:
                moments[key] = old.copy_(value)
            elif value.shape == param.shape:
                moments[key] = torch.empty_like(param).copy_(value)


def save(out, sd, trained, train_step, step, args, generator, log):
    """model.safetensors (fp16, the original CompVis key layout) or lora.safetensors, and train_state.pt, all of one
    step: each is written whole into the staging folder out/.saving, then all are renamed into place
    (files.replace_all). So a failed write (a full disk, said in one line) leaves the folder as the last good save
    left it, and a folder never holds a model of one step beside the train state of another."""
    state = {"step": step, "args": vars(args), "weights": {name: m.state_dict() for name, m in trained.items()},
             "optimizers": [o.state_dict() for o in torch_optimizers(train_step.optimizer)],
             **({} if isinstance(train_step.optimizer, speed.StepInBackward) else
                {"scaler": train_step.scaler.state_dict()}),
             "data_rng": generator.get_state(), "log": log.state()}
    staging = out / ".saving"
    try:
        shutil.rmtree(staging, ignore_errors=True)  # what a run killed while saving left
        staging.mkdir()
        if not args.lora:
            dreambooth.save(sd, staging / "model.safetensors")
        else:
            what = f"the concepts of {Path(args.concepts).name}" if args.concepts else \
                f"{args.instance_prompt!r}, prior {args.prior_prompt!r}{'' if args.prior else ' (none)'}"
            comment = f"DreamBooth: {what}, {args.batch_size} + {args.batch_size} a step"
            save_lora(trained["lora"], staging / "lora.safetensors", kohya_metadata(
                args.lora, args.lora_alpha, Path(args.ckpt).name, learning_rate=args.lr, steps=step,
                max_train_steps=args.steps, seed=args.seed, resolution=args.resolution, training_comment=comment))
            if args.save_merged:
                with trained["lora"].merged():
                    dreambooth.save(sd, staging / "model.safetensors")
        write_atomic(staging / "train_state.pt", lambda tmp: torch.save(state, tmp))
        replace_all(staging, out)
    except (OSError, RuntimeError, SafetensorError) as e:
        shutil.rmtree(staging, ignore_errors=True)
        params = sum(p.numel() for m in (sd.unet, sd.vae, sd.text_encoder) for p in m.parameters())
        trained_params = sum(p.numel() for m in trained.values() for p in m.parameters())
        need = 2 * params + 12 * trained_params  # the fp16 model; the fp32 trained weights and their two moments
        raise log.stop(f"saving step {step} failed: {why_write_failed(e, out, need)}") from None
    log.saved_step = step


def preview_prompts(args, concept):
    """The prompts of a concept's row of the preview grids: the subject, edits of it, and last the class prompt, which
    should keep showing the class in general (if it turns into the subject, the class drifts). The toy model knows
    only its captions' words, so its edits are other shapes and colours, which should keep their own colour."""
    if args.concepts:
        subject, class_word = concept.subject_and_class()
    else:  # the flags name them
        subject = f"{args.token} {args.class_name}" if args.class_name else args.instance_prompt
        class_word = args.class_name or "circle"
    edits = ["a red square", "a blue triangle", f"a yellow {class_word}"] if args.ckpt == "toy" else \
        [f"a {subject} in the snow", f"a {subject} on the beach", f"a painting of a {subject}"]
    return [concept.instance_prompt, *edits, concept.class_prompt]


@torch.no_grad()
def preview(sd, rows, seeds, args, path):
    """A grid of images, a row of prompts per concept, each row from the same fixed seeds, drawn as sample.py draws
    them (the model's guidance scale: SD's 7.5, the toy's from its file), and labelled as A1111 labels a grid: by its
    first image."""
    sd.text_encoder.to(sd.device)
    sd.vae.to(sd.device)
    sd.unet.eval()
    scale = sd.sampling.get("scale", 7.5)
    with autocast(args):  # a row at a time: the memory of one row, whatever the number of concepts
        images = [image for row in rows for image in generate(sd, row, seeds, steps=args.sample_steps, scale=scale,
                                                               height=args.resolution, width=args.resolution,
                                                               progress=False)]
    sd.unet.train()
    if not (args.no_cache and not args.vae):  # --no-cache encodes with the model's own VAE at every step
        sd.vae.to("cpu")
    if not args.train_text_encoder:
        sd.text_encoder.to("cpu")
    path.parent.mkdir(exist_ok=True)
    parameters = a1111_parameters(rows[0][0], "", args.sample_steps, scale, seeds[0], args.resolution, args.resolution,
                                  Path(args.out).name, vae=args.vae and Path(args.vae).name)
    save_png(image_grid(images, cols=len(seeds)), path, parameters)
