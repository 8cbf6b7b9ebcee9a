"""One process per device: accelerate's ``PartialState`` says which process this is and gives it its shard.

Launched alone (``dualguide batch``) it is the only process; under ``accelerate launch``, ``torchrun`` or
several machines each process gets a contiguous share of the planned images (``split_between_processes``),
the same whatever the state of the output folder, so that processes never make the same image.
"""

from __future__ import annotations

from typing import List, Sequence, TypeVar

T = TypeVar("T")


def process_state(device: str = "auto"):
    """The ``PartialState`` of this process: on GPUs when ``device`` allows and CUDA is there, else on CPUs (gloo)."""
    import torch
    from accelerate import PartialState

    cpu = device == "cpu" or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def device_of(state) -> str:
    """The device this process works on: ``cuda:<local rank>`` on GPUs, ``cpu`` on CPUs."""
    return "cpu" if state.device.type == "cpu" else str(state.device)


def shard(state, items: Sequence[T]) -> List[T]:
    """This process's contiguous share of ``items`` (the first processes take one more when it does not divide)."""
    with state.split_between_processes(list(items)) as part:
        return list(part)


def finish(state) -> None:
    """Wait for every process (so the main one reports the whole job), then close the process group."""
    import torch.distributed as dist

    if state.num_processes > 1:
        state.wait_for_everyone()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
