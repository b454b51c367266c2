"""Example models a new user can try in a minute, trained on scikit-learn's handwritten digits."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import nn


def _digits(flat: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """sklearn's 8×8 digits scaled to [0, 1], split 50/50 stratified (train / the dataset)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)
    x = x.reshape(len(x), 64) if flat else x[:, None]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.5, stratify=y, random_state=seed)
    return x_tr, x_te, y_tr, y_te


def digits_cnn() -> nn.Module:
    """A small CNN for 1×8×8 digits, wide enough that weights dominate the ONNX file."""
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


def digits_mlp() -> nn.Module:
    """LeNet-300-100 sized for 64 inputs: 64-300-100-10."""
    from torch import nn

    return nn.Sequential(
        nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
    )


@contextlib.contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """Seeded, single-threaded torch (float sums depend on the thread count)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int = 30,
    lr: float = 2e-3,
    batch: int = 64,
    seed: int = 0,
) -> nn.Module:
    """Plain supervised training with Adam, deterministic for a given seed."""
    import torch

    with _deterministic(seed):
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


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of a torch classifier."""
    import torch

    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def export_model(model: nn.Module, example: np.ndarray, stem: Path) -> dict[str, Path]:
    """stem.pt2 (torch.export) and stem.onnx (dynamo export, one file), dynamic batch dim."""
    import torch

    model = model.eval()
    args = (torch.from_numpy(example[:4]),)
    dynamic = ({0: torch.export.Dim("batch", min=1, max=65536)},)
    pt2, onnx_path = stem.with_suffix(".pt2"), stem.with_suffix(".onnx")
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.export.save(torch.export.export(model, args, dynamic_shapes=dynamic), pt2)
            torch.onnx.export(
                model,
                args,
                str(onnx_path),
                dynamo=True,
                dynamic_shapes=dynamic,
                external_data=False,
            )
    finally:
        logger.setLevel(level)
    return {"pt2": pt2, "onnx": onnx_path}


def _write(
    out_dir: str | Path,
    stem: str,
    npz: str,
    model: nn.Module,
    flat: bool,
    epochs: int,
    seed: int,
    lr: float = 2e-3,
) -> dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x_tr, x_te, y_tr, y_te = _digits(flat=flat, seed=seed)
    with _deterministic(seed):
        model = train(model, x_tr, y_tr, epochs=epochs, lr=lr, seed=seed)
    files = export_model(model, x_te, out / stem)
    np.savez(out / npz, x=x_te, labels=y_te)
    return {**files, "npz": out / npz, "accuracy": accuracy(model, x_te, y_te)}


def write_digits_example(out_dir: str | Path, seed: int = 0) -> dict[str, Any]:
    """digits_cnn.pt2, digits_cnn.onnx and digits.npz (held-out x [N,1,8,8] float32 + labels).

    Returns the paths under "pt2", "onnx", "npz" and the held-out "accuracy" of the torch model.
    """
    import torch

    with _deterministic(seed):
        torch.manual_seed(seed)
        model = digits_cnn()
    return _write(out_dir, "digits_cnn", "digits.npz", model, flat=False, epochs=20, seed=seed)


def write_digits_mlp(out_dir: str | Path, seed: int = 0) -> dict[str, Any]:
    """digits_mlp.pt2, digits_mlp.onnx and digits_flat.npz (x [N,64] float32 + labels)."""
    import torch

    with _deterministic(seed):
        torch.manual_seed(seed)
        model = digits_mlp()
    return _write(
        out_dir, "digits_mlp", "digits_flat.npz", model, flat=True, epochs=60, seed=seed, lr=3e-3
    )


# ----------------------------------------------------------------- quantization test models

TOKENS_VOCAB = 32
TOKENS_LEN = 16
TOKEN_A, TOKEN_B = 1, 2


def token_order_task(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sequences of 16 tokens (vocab 32) holding token A and token B once each, label 1 when A
    comes before B: the model has to attend across positions, so its weights are real."""
    rng = np.random.default_rng(seed)
    x = rng.integers(3, TOKENS_VOCAB, size=(n, TOKENS_LEN)).astype(np.int64)
    for row in x:
        a, b = rng.choice(TOKENS_LEN, size=2, replace=False)
        row[a], row[b] = TOKEN_A, TOKEN_B
    y = (np.argmax(x == TOKEN_A, axis=1) < np.argmax(x == TOKEN_B, axis=1)).astype(np.int64)
    return x, y


def tiny_transformer(d: int = 64, heads: int = 4, layers: int = 2, ff: int = 128) -> nn.Module:
    """Embedding(32, 64) + learned positions, 2 pre-norm encoder blocks with attention written
    from nn.Linear q/k/v/out (exports to plain MatMul/Softmax), mean pooling, Linear(64, 2)."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.heads = heads
            self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))
            self.ff1, self.ff2 = nn.Linear(d, ff), nn.Linear(ff, d)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, s, _ = x.shape
            h = self.norm1(x)

            def split(t: torch.Tensor) -> torch.Tensor:
                return t.reshape(b, s, self.heads, d // self.heads).transpose(1, 2)

            q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
            att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
            ctx = (att @ v).transpose(1, 2).reshape(b, s, d)
            x = x + self.out(ctx)
            return x + self.ff2(torch.relu(self.ff1(self.norm2(x))))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(TOKENS_VOCAB, d)
            self.pos = nn.Parameter(torch.randn(1, TOKENS_LEN, d) * 0.02)
            self.blocks = nn.Sequential(*(Block() for _ in range(layers)))
            self.norm = nn.LayerNorm(d)
            self.classifier = nn.Linear(d, 2)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            x = self.blocks(self.embed(tokens) + self.pos)
            return self.classifier(self.norm(x).mean(1))

    return Encoder()


def write_token_transformer(out_dir: str | Path, seed: int = 0) -> dict[str, Any]:
    """token_transformer.onnx (+ .pt2) and tokens.npz (x [N,16] int64 + labels)."""
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x_tr, y_tr = token_order_task(2000, seed)
    x_te, y_te = token_order_task(512, seed + 1)
    with _deterministic(seed):
        torch.manual_seed(seed)
        model = train(tiny_transformer(), x_tr, y_tr, epochs=8, lr=3e-3, seed=seed)
    files = export_model(model, x_te, out / "token_transformer")
    np.savez(out / "tokens.npz", x=x_te, labels=y_te)
    return {**files, "npz": out / "tokens.npz", "accuracy": accuracy(model, x_te, y_te)}


def separable_cnn() -> nn.Module:
    """MobileNet-style digits net: a stem conv, then depthwise 3×3 + pointwise 1×1 blocks."""
    from torch import nn

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [
            nn.Conv2d(cin, cin, 3, padding=1, groups=cin),
            nn.ReLU(),
            nn.Conv2d(cin, cout, 1),
            nn.ReLU(),
        ]

    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        *block(32, 64),
        nn.MaxPool2d(2),
        *block(64, 128),
        *block(128, 128),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(512, 10),
    )


def write_separable_cnn(out_dir: str | Path, seed: int = 0) -> dict[str, Any]:
    """separable_cnn.pt2, separable_cnn.onnx and digits.npz (x [N,1,8,8] + labels)."""
    import torch

    with _deterministic(seed):
        torch.manual_seed(seed)
        model = separable_cnn()
    return _write(out_dir, "separable_cnn", "digits.npz", model, flat=False, epochs=20, seed=seed)
