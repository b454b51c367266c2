"""Where torch training runs: the requested device resolved against this machine, and the
moves that put a training run's modules on it and bring them back to the CPU for export.

`resolve_device` is the one rule: "cpu" → cpu; "auto" → cuda when torch can use a GPU here,
else cpu; "cuda" → cuda, or an EngineError when torch cannot use one. Whether a GPU is usable
is a parameter (`cuda_usable`, the probe below by default), so the rule is tested without one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Literal

from engine.errors import EngineError

if TYPE_CHECKING:
    import torch
    from torch import nn

DeviceSetting = Literal["auto", "cpu", "cuda"]
DEVICE_SETTINGS: tuple[DeviceSetting, ...] = ("auto", "cpu", "cuda")


def cuda_usable() -> bool:
    """torch is a CUDA build, sees a GPU and can allocate on it (a driver or container that
    hides the GPU fails the allocation, not `is_available`)."""
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        torch.zeros(1, device="cuda")
    except RuntimeError:
        return False
    return True


def resolve_device(setting: str, usable: Callable[[], bool] = cuda_usable) -> str:
    """ "cpu" or "cuda" for the requested setting; `usable` is asked only when it matters."""
    if setting == "cpu":
        return "cpu"
    if setting == "auto":
        return "cuda" if usable() else "cpu"
    if setting == "cuda":
        if usable():
            return "cuda"
        raise EngineError(
            "device_unavailable",
            "This worker is set to train on a GPU (COMPAAS_DEVICE=cuda), but torch cannot use "
            "a CUDA GPU here (no GPU visible to the worker, a CPU-only torch build, or a "
            "driver the build does not support). Run the worker with an NVIDIA GPU and a CUDA "
            "build of torch (docker compose --profile gpu), or set COMPAAS_DEVICE=auto or cpu.",
            field="device",
        )
    raise EngineError(
        "invalid_device",
        f"Unknown device {setting!r}; use one of {', '.join(DEVICE_SETTINGS)}.",
        field="device",
    )


def place(
    device: str, modules: Sequence[nn.Module | None], params: Iterable[torch.Tensor] | None = None
) -> Callable[[], None]:
    """Move the modules, and any of `params` they do not hold (a loss's own projections), to
    `device`; returns the undo that moves them back to the CPU. Nothing moves for the CPU.

    Parameters keep their identity (torch moves a module's parameters in place), so an
    optimizer or a mask lookup built on them before the move still holds.
    """
    if device == "cpu":
        return lambda: None
    held = [m for m in modules if m is not None]
    own = {id(p) for m in held for p in m.parameters()}
    loose = [p for p in params or () if id(p) not in own]

    def move(to: str) -> None:
        for module in held:
            module.to(to)
        for p in loose:
            p.data = p.data.to(to)

    move(device)
    return lambda: move("cpu")
