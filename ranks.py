"""Several processes that work as one, started by torchrun (https://pytorch.org/docs/stable/elastic/run.html):

    torchrun --nproc_per_node 4 train.py --instance photos --prior prior/dog --class dog

torchrun starts the program once per GPU and tells each process its place in environment variables: RANK (0 to
WORLD_SIZE - 1, across all machines), LOCAL_RANK (which GPU of its own machine), WORLD_SIZE, and where rank 0
listens (MASTER_ADDR, MASTER_PORT). The processes then form a group (torch.distributed) in which collective calls
(all_reduce, broadcast, gather) exchange tensors: through NCCL between GPUs, through gloo between CPU processes.
Every process runs the whole program; rank 0 alone writes files and prints.

Without torchrun, or with one process, there is no group: join() returns None and the programs run as they always
do, with no collective call anywhere.
"""
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Group:
    """This process's place in torchrun's group."""
    rank: int   # 0 .. size - 1; rank 0 writes the files
    size: int   # WORLD_SIZE: the processes in all
    local: int  # LOCAL_RANK: which GPU of this machine is this process's

    @property
    def main(self) -> bool:
        return self.rank == 0

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true on any rank (a Ctrl-C that reached some processes first, say), so that all ranks
        act on it at the same step. One all_reduce of one number."""
        flag = torch.tensor(float(flag), device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def average(self, tensors: list[torch.Tensor], bucket: int = 2**26) -> None:
        """Replace each tensor by its mean over the ranks, in place. Tensors are laid end to end into buckets of about
        `bucket` numbers, one all_reduce each: a few large messages are much faster than many small ones, and a
        bucket, unlike all of a model's gradients at once, is little memory."""
        these, numbers = [], 0
        for t in tensors:
            these.append(t)
            numbers += t.numel()
            if numbers >= bucket or t is tensors[-1]:
                flat = torch.cat([x.reshape(-1) for x in these])
                dist.all_reduce(flat)  # the sum: gloo has no average, NCCL does
                flat /= self.size
                for tensor, mean in zip(these, flat.split([x.numel() for x in these])):
                    tensor.copy_(mean.view(tensor.shape))
                these, numbers = [], 0

    def barrier(self) -> None:
        """Wait until every rank is here."""
        dist.barrier(device_ids=[self.local] if dist.get_backend() == "nccl" else None)

    @property
    def device(self) -> torch.device:
        backend = dist.get_backend()
        return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def processes() -> int:
    """How many processes torchrun started (WORLD_SIZE); 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def writes(group: Group | None) -> bool:
    """Whether this process writes the files: the only process, or rank 0 of a group."""
    return group is None or group.main


def on_main(group: Group | None, work):
    """work() done by rank 0 alone (work on the files, which are rank 0's), its result given to every rank; without a
    group, just work(). Where it stops rank 0 with an error, every rank stops here too, and the message shows once."""
    if group is None:
        return work()
    outcome = [None]
    if group.main:
        try:
            outcome = [(work(), None)]
        except SystemExit as e:
            outcome = [(None, e.code)]
    dist.broadcast_object_list(outcome, src=0)
    result, error = outcome[0]
    if error is not None:
        raise SystemExit(error if group.main else 1)
    return result


def gather(group: Group | None, value):
    """Every rank's `value` (any object pickle takes) on rank 0, in rank order, None on the other ranks; without a
    group, [value]."""
    if group is None:
        return [value]
    everyone = [None] * group.size if group.main else None
    dist.gather_object(value, everyone, dst=0)
    return everyone


def join(device: str, program: str) -> tuple[Group | None, str]:
    """Join torchrun's group, if this process was started as one of several. Returns (the group, this process's
    device): the GPU of its LOCAL_RANK under --device cuda; (None, device) without torchrun or with one process.
    The other ranks' standard output goes nowhere, so that each line and progress bar shows once (their errors still
    reach standard error)."""
    if processes() == 1:
        return None, device
    group = Group(int(os.environ["RANK"]), processes(), int(os.environ["LOCAL_RANK"]))
    if device.startswith("cuda"):
        if device != "cuda":
            raise SystemExit(f"{program}: error: --device {device}: under torchrun each process takes the GPU of its "
                             "LOCAL_RANK; give --device cuda")
        device = f"cuda:{group.local}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if not group.main:
        sys.stdout = open(os.devnull, "w")
    return group, device


def leave(group: Group | None) -> None:
    """Leave the group at the end of a run (a process that ends without it gets a warning from torch)."""
    if group is not None and dist.is_initialized():
        dist.destroy_process_group()
