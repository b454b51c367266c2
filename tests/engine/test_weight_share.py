"""`weight_share`: k-means codebooks, the cpz archive, its decoder and the `compaas decode` CLI."""

from __future__ import annotations

import contextlib
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from app.cli import main as cli_main
from engine.io import cpz as archive
from engine.onnxgraph.runtime import make_session
from engine.pipeline import compress

DEEP_COMPRESSION = [
    {"op": "prune", "granularity": "unstructured", "sparsity": 0.9, "scope": "global"},
    {"op": "weight_share", "bits": 5},
]


def _weights(path: str | Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _outputs(path: str | Path, x: np.ndarray) -> np.ndarray:
    session = make_session(Path(path))
    name = session.get_inputs()[0].name
    return np.asarray(session.run(None, {name: x})[0])


def _archive(result: dict[str, Any], index: int = -1) -> Path:
    step = result["steps"][index]
    (extra,) = step["extras"]
    assert extra["format"] == "cpz"
    return Path(extra["path"])


@pytest.fixture(scope="module")
def mlp_shared(mlp_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    workdir = tmp_path_factory.mktemp("ws-mlp")
    return compress(
        mlp_files["onnx"], DEEP_COMPRESSION, dataset_path=mlp_files["npz"], workdir=workdir
    )


def test_deep_compression_archive_is_small_and_decodes_exactly(
    mlp_shared: dict[str, Any], mlp_files: dict[str, Path], tmp_path: Path
) -> None:
    step = mlp_shared["steps"][1]
    packed = _archive(mlp_shared)
    metrics = step["metrics"]
    assert metrics["archive_size_bytes"] == packed.stat().st_size
    ratio = metrics["archive_compression_ratio"]
    # 90% global sparsity with the classifier left dense: ~6.3 KB of a 209 KB fp32 ONNX.
    assert ratio >= 30, step["details"]
    # Ratios are reported with 4 decimals.
    exact = step["details"]["reference_size_bytes"] / packed.stat().st_size
    assert ratio == pytest.approx(exact, abs=5e-5)
    # The archive is delivered with the final artifacts.
    assert any(a["format"] == "cpz" for a in mlp_shared["artifacts"])

    dense = Path(step["artifact"]["path"])
    decoded = tmp_path / "decoded.onnx"
    assert cli_main(["decode", str(packed), "-o", str(decoded)]) == 0
    assert decoded.read_bytes() == dense.read_bytes()  # byte-identical rebuild
    data = np.load(mlp_files["npz"])
    x, labels = data["x"], data["labels"]
    a, b = _outputs(dense, x), _outputs(decoded, x)
    assert np.array_equal(a, b)
    assert float((a.argmax(1) == labels).mean()) == float((b.argmax(1) == labels).mean())
    assert float((b.argmax(1) == labels).mean()) == pytest.approx(
        metrics["accuracy_top1"], abs=1e-6
    )


def test_shared_weights_keep_zeros_and_use_at_most_2_to_the_bits_values(
    mlp_shared: dict[str, Any],
) -> None:
    pruned = _weights(mlp_shared["steps"][0]["artifact"]["path"])
    shared = _weights(mlp_shared["steps"][1]["artifact"]["path"])
    layers = mlp_shared["steps"][1]["details"]["layers"]
    for name in ("0.weight", "2.weight", "4.weight"):
        assert np.array_equal(pruned[name] == 0, shared[name] == 0), name
        values = np.unique(shared[name][shared[name] != 0])
        assert len(values) <= 32
        assert np.array_equal(values.astype(np.float16).astype(np.float32), values)  # fp16 book
        assert layers[name]["nonzeros"] == int(np.count_nonzero(shared[name]))
        assert layers[name]["bits"] == 5
    for name in ("0.bias", "2.bias", "4.bias"):
        assert len(np.unique(shared[name])) <= 256
        assert layers[name]["kind"] == "uniform"
    # 5-bit sharing after pruning costs (almost) no accuracy on its own.
    drop = mlp_shared["steps"][0]["metrics"]["accuracy_top1"] - mlp_shared["final"]["accuracy_top1"]
    assert drop <= 0.01


def test_eight_bits_on_the_cnn(digits_files: dict[str, Path], tmp_path: Path) -> None:
    result = compress(
        digits_files["onnx"],
        [{"op": "weight_share", "bits": 8, "init": "density"}],
        dataset_path=digits_files["npz"],
        workdir=tmp_path,
    )
    assert result["ratios"]["accuracy_drop"] <= 0.01
    step = result["steps"][0]
    assert step["metrics"]["archive_compression_ratio"] > 3.5
    weights = _weights(step["artifact"]["path"])
    conv = [w for w in weights.values() if w.ndim >= 2]
    assert len(conv) == 5 and all(len(np.unique(w)) <= 256 for w in conv)
    decoded = archive.decode(_archive(result).read_bytes())
    assert decoded.SerializeToString() == Path(step["artifact"]["path"]).read_bytes()


@pytest.mark.slow
def test_grouped_and_depthwise_convs_round_trip(tmp_path: Path) -> None:
    import torch
    from torch import nn

    from engine.examples import export_model

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 5, bias=False),
    )
    x = np.random.default_rng(0).normal(size=(8, 4, 6, 6)).astype(np.float32)
    files = export_model(model, x, tmp_path / "grouped")
    result = compress(
        files["onnx"],
        [
            {"op": "prune", "sparsity": 0.5, "include_last_layer": True},
            {"op": "weight_share", "bits": 3, "init": "random", "huffman": False},
        ],
        workdir=tmp_path / "job",
    )
    dense = Path(result["steps"][1]["artifact"]["path"])
    decoded = tmp_path / "decoded.onnx"
    archive.decode_file(_archive(result), decoded)
    assert decoded.read_bytes() == dense.read_bytes()
    assert np.array_equal(_outputs(dense, x), _outputs(decoded, x))
    for w in _weights(dense).values():
        if w.ndim >= 2:
            assert len(np.unique(w[w != 0])) <= 8


def test_corrupt_truncated_and_foreign_archives_are_clear_errors(
    mlp_shared: dict[str, Any], tmp_path: Path
) -> None:
    data = _archive(mlp_shared).read_bytes()
    with pytest.raises(archive.ArchiveError, match="truncated"):
        archive.decode(data[:-10])
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    with pytest.raises(archive.ArchiveError, match="CRC-32"):
        archive.decode(bytes(flipped))
    with pytest.raises(archive.ArchiveError, match="not start with"):
        archive.decode(b"PK\x03\x04" + data[4:])
    newer = data[:3] + bytes([archive.VERSION + 1]) + data[4:]
    with pytest.raises(archive.ArchiveError, match="version 2 is not supported"):
        archive.decode(newer)
    bad = tmp_path / "bad.cpz"
    bad.write_bytes(data[:100])
    assert cli_main(["decode", str(bad), "-o", str(tmp_path / "x.onnx")]) == 1
    # Corruption that a matching checksum lets through still ends in ArchiveError, never a crash.
    rng = np.random.default_rng(0)
    for _ in range(60):
        body = bytearray(data[8:])
        for pos in rng.integers(0, len(body), size=3):
            body[pos] = int(rng.integers(0, 256))
        forged = data[:4] + struct.pack("<I", zlib.crc32(bytes(body))) + bytes(body)
        with contextlib.suppress(archive.ArchiveError):
            archive.decode(forged)


@pytest.mark.parametrize("cap", [1, 2, 7, 64])
def test_gap_coding_round_trips(cap: int) -> None:
    rng = np.random.default_rng(cap)
    mask = rng.random(5000) < 0.05
    mask[:3] = True
    mask[4000:4900] = False  # a long run of zeros needs fillers
    positions = np.flatnonzero(mask)
    symbols = archive.gap_symbols(positions, cap)
    assert symbols.max() <= cap
    assert np.array_equal(archive.gap_positions(symbols, cap), positions)


def test_canonical_huffman_streams_round_trip_and_limit_code_lengths() -> None:
    rng = np.random.default_rng(0)
    fib = np.array([1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987, 1597, 2584])
    symbols = np.repeat(np.arange(len(fib)), fib)  # would need 17-bit codes unlimited
    rng.shuffle(symbols)
    assert archive.huffman_lengths(np.bincount(symbols)).max() <= archive.MAX_CODE_LEN
    for syms, alphabet in [(symbols, len(fib)), (np.zeros(7, np.int64), 1), (symbols, 40)]:
        stream = archive.encode_stream(syms, alphabet)
        reader = archive._Reader(stream)
        assert np.array_equal(archive.decode_stream(reader, len(syms)), syms)
        assert reader.pos == len(stream)
