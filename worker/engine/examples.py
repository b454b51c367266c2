"""Example models a new user can try in a minute: trained on scikit-learn's handwritten digits."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np


def _digits(flat: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)
    x = x.reshape(len(x), 64) if flat else x[:, None]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, stratify=y, random_state=seed)
    return x_tr, x_te, y_tr, y_te


def digits_cnn() -> Any:
    """A small CNN for 1×8×8 digits (~226k parameters, so weights dominate the file)."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(512, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


def digits_mlp() -> Any:
    """LeNet-300-100 sized for 64 inputs: 64-300-100-10."""
    from torch import nn

    return nn.Sequential(
        nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
    )


def train(
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int = 30,
    lr: float = 2e-3,
    batch: int = 64,
    seed: int = 0,
) -> Any:
    """Plain supervised training, deterministic for a given seed."""
    import torch

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), batch):
            idx = order[i : i + batch]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    return model.eval()


def accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    import torch

    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def export_model(model: Any, example: np.ndarray, stem: Path) -> dict[str, Path]:
    """Write stem.pt2 (torch.export, dynamic batch) and stem.onnx (dynamo export, one file)."""
    import logging

    import torch

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    model = model.eval()
    args = (torch.from_numpy(example[:4]),)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, args, dynamic_shapes=({0: batch},))
        pt2 = stem.with_suffix(".pt2")
        torch.export.save(program, pt2)
        onnx_path = stem.with_suffix(".onnx")
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(program, f=str(onnx_path), dynamo=True, external_data=False)
    return {"pt2": pt2, "onnx": onnx_path}


def write_digits_example(out_dir: str | Path, seed: int = 0) -> dict[str, Any]:
    """digits_cnn.pt2, digits_cnn.onnx and digits.npz (held-out x [N,1,8,8] + labels)."""
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    x_tr, x_te, y_tr, y_te = _digits(flat=False, seed=seed)
    model = train(digits_cnn(), x_tr, y_tr, epochs=25, seed=seed)
    files = export_model(model, x_te, out / "digits_cnn")
    np.savez(out / "digits.npz", x=x_te, labels=y_te)
    return {**files, "npz": out / "digits.npz", "accuracy": accuracy(model, x_te, y_te)}


def write_digits_mlp(out_dir: str | Path, seed: int = 0) -> dict[str, Any]:
    """digits_mlp.pt2, digits_mlp.onnx and digits_flat.npz (x [N,64] + labels)."""
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    x_tr, x_te, y_tr, y_te = _digits(flat=True, seed=seed)
    model = train(digits_mlp(), x_tr, y_tr, epochs=40, seed=seed)
    files = export_model(model, x_te, out / "digits_mlp")
    np.savez(out / "digits_flat.npz", x=x_te, labels=y_te)
    return {**files, "npz": out / "digits_flat.npz", "accuracy": accuracy(model, x_te, y_te)}
