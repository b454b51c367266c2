"""The zoo's torch-path rows: a .pt2 uploaded over REST (`compaas up`, embedded default) with a
training pipeline (prune, distill, ...), the delivered ONNX measured against the original on
held-out inputs the job never saw, with PASS/FAIL against each row's criteria.

    .venv/bin/python -m bench.zoo_torch [--models resnet18-digits] [--out table.md] [--keep DIR]

A row is a TorchSpec: how the .pt2 is made (trained once here and cached under
~/.cache/compaas-zoo, or $COMPAAS_ZOO_CACHE), how its job dataset and held-out inputs are made,
the pipeline, and the pass criteria. The service side reuses bench/zoo.py's Service. The
CNNs are bench/cnns.py's torchvision-layout modules; see docs/zoo.md. Not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.zoo import (  # noqa: E402
    CACHE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SEED,
    Feeds,
    Service,
    _crop,
    _photos,
)

# --------------------------------------------------------------------------- digits images

DIGITS_SIDE = 64
# sklearn's digits (1797 real handwritten 8x8 scans), split by index: the teacher trains on
# the first part, the job gets the second, the bench holds the third out (never uploaded).
TEACHER_ROWS = range(0, 1000)
JOB_ROWS = range(1000, 1500)
HELD_ROWS = range(1500, 1797)


def digit_images(rows: range, variants: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each digit of `rows` drawn `variants` times at DIGITS_SIDE px: upsampled, rotated
    (±15°), scaled and shifted, in a random ink colour over a dimmed crop of sklearn's sample
    photos, with noise. Returns ImageNet-normalised NCHW float32 and the labels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    photos = _photos()
    side = DIGITS_SIDE
    images, labels = [], []
    for _ in range(variants):
        for i in rows:
            glyph = Image.fromarray((digits.images[i] * (255 / 16)).astype(np.uint8))
            size = int(side * rng.uniform(0.55, 0.9))
            glyph = glyph.resize((size, size), Image.Resampling.BICUBIC)
            glyph = glyph.rotate(float(rng.uniform(-15, 15)), Image.Resampling.BILINEAR)
            alpha = np.zeros((side, side), np.float32)
            y, x = (int(v) for v in rng.integers(0, side - size + 1, 2))
            alpha[y : y + size, x : x + size] = np.asarray(glyph, np.float32) / 255
            bg = _crop(rng, photos[int(rng.integers(len(photos)))], side, side).astype(np.float32)
            bg *= rng.uniform(0.3, 0.7)
            ink = rng.uniform(150, 255, 3).astype(np.float32)
            img = bg * (1 - alpha[..., None]) + ink * alpha[..., None]
            img += rng.normal(0, 6, img.shape)
            images.append(np.clip(img, 0, 255) / 255)
            labels.append(int(digits.target[i]))
    arr = (np.stack(images).astype(np.float32) - IMAGENET_MEAN) / IMAGENET_STD
    x = np.ascontiguousarray(arr.transpose(0, 3, 1, 2), dtype=np.float32)
    return x, np.asarray(labels, np.int64)


# --------------------------------------------------------------------------- models


def train_classifier(model: Any, x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> float:
    """Cross-entropy, AdamW with a one-cycle schedule, batch 64, no augmentation (every
    drawing already differs); returns the last epoch's training accuracy."""
    import torch

    torch.manual_seed(seed)
    batch = 64
    steps = epochs * ((len(x) + batch - 1) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    acc = 0.0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(xs))
        correct = 0
        t0 = time.monotonic()
        for i in range(0, len(xs), batch):
            idx = order[i : i + batch]
            logits = model(xs[idx])
            loss = torch.nn.functional.cross_entropy(logits, ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            correct += int((logits.argmax(1) == ys[idx]).sum())
        acc = correct / len(xs)
        took = time.monotonic() - t0
        _log(f"  epoch {epoch + 1}/{epochs}: train accuracy {acc:.3f} ({took:.0f} s)")
    model.eval()
    return acc


def export_pt2(model: Any, example: np.ndarray, out: Path) -> Path:
    """torch.export with a dynamic batch, saved as a .pt2 (what a team uploads)."""
    import torch

    model.eval()
    batch = torch.export.Dim("batch", min=1, max=65536)
    args = (torch.from_numpy(example[:4]),)
    program = torch.export.export(model, args, dynamic_shapes=({0: batch},))
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(out))
    return out


def trained_cnn(key: str, build: Callable[[], Any], drawings: int, epochs: int) -> Path:
    """`build()` trained once on `drawings` drawings of each of TEACHER_ROWS for `epochs` and
    cached as <CACHE>/torch/<key>-<drawings>x<epochs>e.pt2, its held-out accuracy beside it."""
    name = f"{key}-{drawings}x{epochs}e"
    out = CACHE / "torch" / f"{name}.pt2"
    if out.exists():
        return out
    import torch

    _log(f"{key}: training once (cached as {out})")
    x, y = digit_images(TEACHER_ROWS, drawings, SEED + 10)
    model = build()
    with torch.random.fork_rng():
        train_classifier(model, x, y, epochs, SEED)
    hx, hy = digit_images(HELD_ROWS, 1, SEED + 12)
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(hx)).argmax(1).numpy() == hy).mean())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps({"held_out_accuracy": accuracy, "epochs": epochs, "train_images": len(x)})
    )
    _log(f"{key}: held-out accuracy {accuracy:.3f}")
    return export_pt2(model, x, out)


def _log(message: str) -> None:
    print(f"[zoo_torch] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class TorchSpec:
    """One torch-path row: what is uploaded, what the job does, what is measured and passed."""

    key: str
    title: str
    model: Callable[[], Path]  # the .pt2 a team uploads (made once, cached)
    data: Callable[[], tuple[Feeds, Feeds]]  # (the job's dataset, held-out inputs)
    pipeline: list[dict[str, Any]]
    task: str  # the service's evaluation task
    measure: Callable[[Path, Path, Feeds], dict[str, float]]  # original, final, held → figures
    criteria: dict[str, tuple[str, float]]  # figure → ("<=" | ">=", bound)
    source: str = ""  # where the must-show comes from
    # figures read from the finished job's document (e.g. a step's details), added to measure's
    from_job: Callable[[dict[str, Any]], dict[str, float]] | None = None
    holdout: float | None = None  # the job's evaluation.holdout (None: the service's default)


def classifier_figures(original: Path, final: Path, held: Feeds) -> dict[str, float]:
    """MACs of one sample (one onnxruntime run), top-1 agreement with the original over the
    held-out inputs, and p50 latency side by side (onnxruntime CPU, batch 1, 1 thread)."""
    import onnx

    from bench.zoo import run_all
    from engine.onnxgraph.metrics import latency_side_by_side, runtime_macs

    one = {k: v[:1] for k, v in held.items()}
    macs = [runtime_macs(onnx.load(str(p)), one) or 0 for p in (original, final)]
    ref, out = run_all(original, held)[0], run_all(final, held)[0]
    n = len(next(iter(held.values())))
    feeds = [{k: v[i : i + 1] for k, v in held.items()} for i in range(min(n, 16))]
    ms = latency_side_by_side([original, final], feeds, 1)
    return {
        "macs_ratio": macs[1] / macs[0],
        "agreement_top1": float(np.mean(ref.argmax(-1) == out.argmax(-1))),
        "latency_ratio": ms[1] / ms[0],
        "macs_original": float(macs[0]),
        "macs_final": float(macs[1]),
        "latency_ms_original": ms[0],
        "latency_ms_final": ms[1],
    }


def digits_data() -> tuple[Feeds, Feeds]:
    """The job's dataset: 4 drawings of each of JOB_ROWS, no labels (the job distils to the
    original's outputs); held out: 2 drawings of each of HELD_ROWS, from another seed."""
    job, _ = digit_images(JOB_ROWS, 4, SEED + 11)
    held, _ = digit_images(HELD_ROWS, 2, SEED + 12)
    return {"x": job}, {"x": held}


CNN_MUST_SHOW = {
    "macs_ratio": ("<=", 0.5),
    "agreement_top1": (">=", 0.95),
    "latency_ratio": ("<=", 0.6),
}


def _resnet18() -> Path:
    from bench.cnns import resnet18

    return trained_cnn("resnet18-digits", lambda: resnet18(10), 5, 5)


def _mobilenet_v3_small() -> Path:
    from bench.cnns import mobilenet_v3_small

    return trained_cnn("mobilenet-v3-small-digits", lambda: mobilenet_v3_small(10), 5, 15)


# --------------------------------------------------------------------------- MiniLM


MINILM_JOB_SENTENCES = 1190


def _minilm() -> Path:
    """all-MiniLM-L6-v2 (BertModel + mean pooling + L2 norm) as the .pt2 a team uploads."""
    from bench.prune_transformer import export_minilm_pt2

    out = CACHE / "torch" / "all-MiniLM-L6-v2-meanpool-l2.pt2"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        export_minilm_pt2(out)
    return out


def minilm_data() -> tuple[Feeds, Feeds]:
    """The job's dataset: 1190 sentences of the Python documentation's help topics (tokenized,
    sequence 32); held out: 128 other sentences of the same topics that the job never gets."""
    from bench.prune_transformer import prose_inputs

    job = prose_inputs(MINILM_JOB_SENTENCES, False, 1)
    held = prose_inputs(128, False, 1, skip=MINILM_JOB_SENTENCES)
    return job, held


MINILM_CORPUS_SENTENCES = 8192
MINILM_DISTILL_EPOCHS = 7
MINILM_HOLDOUT = 0.1  # 819 of the 8192 sentences score the epochs; the rest train
MINILM_HELD = 1024  # the bench's held-out sentences: the next of the same pool
MINILM_HIDDEN_WEIGHT = 10.0


def minilm_corpus_split() -> tuple[list[str], list[str]]:
    """The pruning row's sentences: the job's MINILM_CORPUS_SENTENCES English sentences of the
    help topics and the standard library's docstrings (`bench.prune_transformer.corpus`,
    shuffled), and the next MINILM_HELD of the same pool, which the job never gets."""
    from bench.prune_transformer import corpus

    pool = corpus(MINILM_CORPUS_SENTENCES + MINILM_HELD, 1)
    return pool[:MINILM_CORPUS_SENTENCES], pool[MINILM_CORPUS_SENTENCES:]


def minilm_corpus_data() -> tuple[Feeds, Feeds]:
    """minilm_corpus_split, tokenized: (the job's dataset, the held-out inputs)."""
    from bench.prune_transformer import tokenize

    job, held = minilm_corpus_split()
    return tokenize(job), tokenize(held)


def embedding_figures(original: Path, final: Path, held: Feeds) -> dict[str, float]:
    """MACs of one sentence (one onnxruntime run), the mean and lowest cosine of the final
    embedding to the original's over the held-out sentences, and p50 latency side by side."""
    import onnx

    from bench.zoo import run_all
    from engine.onnxgraph.metrics import latency_side_by_side, runtime_macs

    one = {k: v[:1] for k, v in held.items()}
    macs = [runtime_macs(onnx.load(str(p)), one) or 0 for p in (original, final)]
    a, b = run_all(original, held)[0], run_all(final, held)[0]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    n = len(next(iter(held.values())))
    feeds = [{k: v[i : i + 1] for k, v in held.items()} for i in range(min(n, 16))]
    ms = latency_side_by_side([original, final], feeds, 1)
    return {
        "macs_ratio": macs[1] / macs[0],
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "latency_ratio": ms[1] / ms[0],
        "macs_original": float(macs[0]),
        "macs_final": float(macs[1]),
        "latency_ms_original": ms[0],
        "latency_ms_final": ms[1],
    }


def qat_figures(job: dict[str, Any]) -> dict[str, float]:
    """QAT's own ONNX-measured figures on the job's held-out split: post-training int8, the
    best QAT epoch, and their difference (what the service delivered is the better one)."""
    qat = job["steps"][-1]["details"]["qat"]
    metric = next(iter(qat["post_training"]))
    post, trained = qat["post_training"][metric], (qat.get("qat") or {}).get(metric)
    delivered = trained if qat.get("delivered") == "qat" else post
    return {
        "post_training_cosine": post,
        "qat_cosine": trained if trained is not None else float("nan"),
        "delivered_minus_post_training": delivered - post,
    }


BERT_MUST_SHOW = {
    "macs_ratio": ("<=", 0.75),
    "cosine_mean": (">=", 0.98),
    "latency_ratio": ("<=", 0.8),
}

ROWS = [
    TorchSpec(
        key="resnet18-digits",
        title=f"ResNet-18 (torchvision layout), {DIGITS_SIDE}px digits on photos",
        model=_resnet18,
        data=digits_data,
        pipeline=[
            {"op": "prune", "granularity": "channels", "sparsity": 0.5},
            {"op": "distill", "epochs": 12},
        ],
        task="classification",
        measure=classifier_figures,
        criteria=CNN_MUST_SHOW,
        source="issue 13: channels 50 % + distill",
    ),
    TorchSpec(
        key="mobilenet-v3-small-digits",
        title=f"MobileNetV3-small (SE, hard-swish), {DIGITS_SIDE}px digits on photos",
        model=_mobilenet_v3_small,
        data=digits_data,
        pipeline=[
            {"op": "prune", "granularity": "channels", "sparsity": 0.5},
            {"op": "distill", "epochs": 30},
        ],
        task="classification",
        measure=classifier_figures,
        criteria=CNN_MUST_SHOW,
        source="issue 13's CNN bar, on the SE / hard-swish architecture",
    ),
    TorchSpec(
        key="minilm-heads-ffn",
        title="all-MiniLM-L6-v2 sentence encoder, heads and FFN channels 30 % + distill",
        model=_minilm,
        data=minilm_corpus_data,
        pipeline=[
            {"op": "prune", "granularity": "channels", "sparsity": 0.3, "samples": 4096},
            {
                "op": "distill",
                "epochs": MINILM_DISTILL_EPOCHS,
                "batch_size": 16,
                "lr": 1e-4,
                "hidden_weight": MINILM_HIDDEN_WEIGHT,
            },
        ],
        holdout=MINILM_HOLDOUT,
        task="embedding",
        measure=embedding_figures,
        criteria=BERT_MUST_SHOW,
        source="issue 13: a BERT-family encoder, heads and FFN pruned 30 % + distill",
    ),
    TorchSpec(
        key="minilm-qat",
        title="all-MiniLM-L6-v2 sentence encoder, QAT int8",
        model=_minilm,
        data=minilm_data,
        pipeline=[{"op": "quantize", "mode": "qat", "dtype": "int8", "epochs": 2}],
        task="embedding",
        measure=embedding_figures,
        criteria={"delivered_minus_post_training": (">=", 0.0), "cosine_mean": (">=", 0.98)},
        source="issue 13: QAT int8 on the same encoder, cosine ≥ post-training int8",
        from_job=qat_figures,
    ),
]


def verdict(figures: dict[str, float], criteria: dict[str, tuple[str, float]]) -> dict[str, bool]:
    """Each criterion's PASS (True) or FAIL (False)."""
    return {
        k: (figures[k] <= bound if how == "<=" else figures[k] >= bound)
        for k, (how, bound) in criteria.items()
    }


def run_row(service: Service, spec: TorchSpec, tmp: Path, timeout_s: float) -> dict[str, Any]:
    """Upload, submit, wait, download and measure one row over REST."""
    from engine.onnxgraph.convert import pt2_to_onnx

    pt2 = spec.model()
    job_set, held = spec.data()
    npz = tmp / f"{spec.key}.npz"
    np.savez(npz, **job_set)
    original = pt2_to_onnx(pt2, tmp / f"{spec.key}-original.onnx")
    model_id, dataset_id = service.upload(spec, pt2, npz)  # type: ignore[arg-type]
    service.wait_ready(spec, model_id)  # type: ignore[arg-type]
    body = {
        "model_id": model_id,
        "dataset_id": dataset_id,
        "pipeline": spec.pipeline,
        # measured side by side even under the quality floor; the row shows the verdict
        "evaluation": {
            "task": spec.task,
            "allow_below_floor": True,
            **({"holdout": spec.holdout} if spec.holdout is not None else {}),
        },
        "export": ["onnx"],
    }
    t0 = time.monotonic()
    job_id = service.create_job(body)
    final = tmp / f"{spec.key}-final.onnx"
    job = service.wait(job_id, final, timeout_s)
    took = time.monotonic() - t0
    row: dict[str, Any] = {"key": spec.key, "job": job, "wall_s": took}
    if job["status"] != "succeeded":
        row["error"] = job.get("error")
        return row
    row["figures"] = spec.measure(original, final, held)
    if spec.from_job is not None:
        row["figures"].update(spec.from_job(job))
    row["pass"] = verdict(row["figures"], spec.criteria)
    row["held_out"] = len(next(iter(held.values())))
    row["job_samples"] = len(next(iter(job_set.values())))
    return row


def render(spec: TorchSpec, row: dict[str, Any]) -> str:
    lines = [f"### {spec.title}", "", "| | measured | must show | |", "|---|---|---|---|"]
    pipeline = " + ".join(
        f"{p['op']} " + ", ".join(f"{k} {v}" for k, v in p.items() if k != "op")
        for p in spec.pipeline
    )
    lines.append(f"| pipeline | {pipeline} | | |")
    lines.append(f"| job wall time (submit → done) | {row['wall_s']:.0f} s | | |")
    if "figures" not in row:
        lines.append(f"| job | {row['job']['status']}: {str(row.get('error'))[:200]} | | FAIL |")
        return "\n".join(lines)
    f = row["figures"]
    for k, (how, bound) in spec.criteria.items():
        mark = "PASS" if row["pass"][k] else "FAIL"
        lines.append(f"| {k} | {f[k]:.3f} | {how} {bound} | {mark} |")
    lines.append(f"| MACs (one sample) | {f['macs_original']:,.0f} → {f['macs_final']:,.0f} | | |")
    lines.append(
        f"| latency p50 (ms) | {f['latency_ms_original']:.2f} → {f['latency_ms_final']:.2f} | | |"
    )
    lines.append(f"| samples: job / held out | {row['job_samples']} / {row['held_out']} | | |")
    quality = row["job"].get("quality") or {}
    lines.append(f"| job verdict (floor) | {quality.get('verdict')} ({quality.get('floor')}) | | |")
    for step in row["job"].get("steps", []):
        details = step.get("details") or {}
        held = details.get("held_out")
        if held:
            lines.append(f"| {step['op']} held-out (job's split) | {held} | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="", help="comma-separated keys (default: all)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per job")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("--keep", type=Path, default=None, help="keep files and job JSONs here")
    args = parser.parse_args()
    keys = [k for k in args.models.split(",") if k]
    specs = [s for s in ROWS if not keys or s.key in keys]
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        for spec in specs:  # models and data first: training once is not the job's time
            spec.model()
        service = Service(tmp)
        try:
            tables = []
            for spec in specs:
                _log(f"{spec.key}: submitting {len(spec.pipeline)} step(s)")
                row = run_row(service, spec, tmp, args.timeout)
                (tmp / f"{spec.key}-job.json").write_text(json.dumps(row, indent=1, default=str))
                tables.append(render(spec, row))
        finally:
            service.close()
    text = "\n\n".join(tables)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
