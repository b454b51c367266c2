"""Hostile model files generated in the tests: TorchScript that runs code, crafted .pt2 archives."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

CANARY_TEXT = b"canary: must never change"


def evil_torchscript(path: Path, secret: Path, canary: Path) -> Path:
    """TorchScript whose __setstate__ reads `secret` and writes into `canary` with from_file."""
    import torch

    class Evil(torch.nn.Module):
        def __init__(self, secret: str, canary: str) -> None:
            super().__init__()
            self.secret = secret
            self.canary = canary

        @torch.jit.export
        def __getstate__(self) -> tuple[str, str, bool]:
            return (self.secret, self.canary, self.training)

        @torch.jit.export
        def __setstate__(self, state: tuple[str, str, bool]) -> None:
            self.secret = state[0]
            self.canary = state[1]
            self.training = state[2]
            stolen = torch.from_file(state[0], shared=False, size=6, dtype=torch.uint8)
            out = torch.from_file(state[1], shared=True, size=6, dtype=torch.uint8)
            out.copy_(stolen)
            out.fill_(0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    torch.jit.save(torch.jit.script(Evil(str(secret), str(canary))), str(path))
    return path


def small_pt2(path: Path, with_cond: bool = False, dynamic: bool = False) -> Path:
    """A real exported Linear (optionally with a torch.cond whose branches are subgraphs, or a
    dynamic batch dimension, which the program stores as sympy expressions)."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fc(x)
            if with_cond:
                return torch.cond(y.sum() > 0, lambda a: a + 1, lambda a: a - 1, (y,))
            return y

    shapes = ({0: torch.export.Dim("batch", min=2, max=64)},) if dynamic else None
    program = torch.export.export(Net(), (torch.randn(3, 4),), dynamic_shapes=shapes)
    torch.export.save(program, str(path))
    return path


def program_member(names: list[str]) -> str:
    return next(n for n in names if n.endswith(".json") and "/models/" in f"/{n}")


def rewrite(src: Path, dst: Path, edit: dict[str, Any]) -> Path:
    """Copy a zip, replacing members: value bytes, or ("bomb", n) for n zero bytes deflated."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            rel = info.filename.split("/", 1)[1]
            new = edit.get(rel)
            if isinstance(new, tuple):
                chunk = bytes(1024 * 1024)
                zi = zipfile.ZipInfo(info.filename)
                zi.compress_type = zipfile.ZIP_DEFLATED
                with zout.open(zi, "w", force_zip64=True) as sink:
                    for _ in range(new[1] // len(chunk)):
                        sink.write(chunk)
            elif new is not None:
                zout.writestr(info.filename, new)
            else:
                zout.writestr(info, zin.read(info.filename))
    return dst


def edit_program(src: Path, dst: Path, change: Any) -> Path:
    """Rewrite the serialized program JSON with `change(program)`."""
    with zipfile.ZipFile(src) as zin:
        name = program_member(zin.namelist())
        program = json.loads(zin.read(name))
    change(program)
    return rewrite(src, dst, {name.split("/", 1)[1]: json.dumps(program).encode()})
