"""The compaas weight-sharing archive (.cpz): a compact, versioned storage/transfer format.

Written by the `weight_share` op, read back by `decode()` (or `compaas decode`). This module
needs numpy, onnx and zstandard only — no torch, no onnxruntime — so a small client can ship it.
The byte layout is documented in docs/archive-format.md; in short:

    "CPZ" | version u8 | crc32 u32 (of everything after it) |
    varint graph_len | zstd(ModelProto without the coded tensors' data) |
    varint n_records | n_records × record

A record rebuilds one float32 initializer of the graph (named by its index there): a k-means
`shared` tensor (fp16/fp32 codebook, Huffman-coded centroid indices of the nonzeros and
Huffman-coded zero-run gaps to their positions) or a `uniform` tensor (linear n-bit levels
lo + q·step, for biases). `decode()` rebuilds a ModelProto whose tensors are byte-for-byte the
values the encoder wrote into the step's dense ONNX.
"""

from __future__ import annotations

import heapq
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"CPZ"
VERSION = 1
MAX_CODE_LEN = 15  # code lengths are stored as 4-bit nibbles
GRAPH_ZSTD_LEVEL = 22

KIND_SHARED = 0
KIND_UNIFORM = 1
STREAM_FIXED = 0
STREAM_HUFFMAN = 1
FLAG_DENSE = 1  # every element is coded: no positions stream
FLAG_FP32_CODEBOOK = 2
FLAG_TRANSPOSED = 4  # positions run over the [shape[0], rest] matrix transposed (column-major)
GAP_CAPS = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# The graph is zstd-compressed with this raw-content dictionary: a serialized template ONNX
# model with the usual Conv/Gemm/MatMul/pooling nodes and attributes, so a small graph does not
# pay for spelling them out. Part of format version 1: never change these bytes (SHA-256
# a6fe38fdf520444fc87743def1dcfd9f2f56557974e8a8cd1965f6481a53967c).
GRAPH_DICT_B64 = (
    "CAoSB3B5dG9yY2gaCjIuMTMuMCtjcHU61wcKqQEKBWlucHV0CggwLndlaWdodAoGMC5iaWFzEgZjb252MmQaC25v"
    "ZGVfY29udjJkIgRDb252KhUKCGF1dG9fcGFkIgZOT1RTRVSgAQMqEgoJZGlsYXRpb25zQAFAAaABByoMCgVncm91"
    "cBgBoAECKhUKDGtlcm5lbF9zaGFwZUADQAOgAQcqEQoEcGFkc0ABQAFAAUABoAEHKhAKB3N0cmlkZXNAAUABoAEH"
    "Ch8KBmNvbnYyZBIEcmVsdRoJbm9kZV9yZWx1IgRSZWx1CqUBCgRyZWx1EgptYXhfcG9vbDJkGg9ub2RlX21heF9w"
    "b29sMmQiB01heFBvb2wqFQoIYXV0b19wYWQiBk5PVFNFVKABAyoQCgljZWlsX21vZGUYAKABAioSCglkaWxhdGlv"
    "bnNAAUABoAEHKhUKDGtlcm5lbF9zaGFwZUACQAKgAQcqEQoEcGFkc0AAQABAAEAAoAEHKhAKB3N0cmlkZXNAAkAC"
    "oAEHCjMKCm1heF9wb29sMmQSBHZpZXcaCW5vZGVfdmlldyIHRmxhdHRlbioLCgRheGlzGAGgAQIKNgoBeAoFdmFs"
    "XzASBHZpZXcaCW5vZGVfdmlldyIHUmVzaGFwZSoQCglhbGxvd3plcm8YAaABAgpyCgRyZWx1CggxLndlaWdodAoG"
    "MS5iaWFzEgZsaW5lYXIaC25vZGVfbGluZWFyIgRHZW1tKg8KBWFscGhhFQAAgD+gAQEqDgoEYmV0YRUAAIA/oAEB"
    "Kg0KBnRyYW5zQRgAoAECKg0KBnRyYW5zQhgBoAECCi8KBnJlbHVfMQoIMi53ZWlnaHQSBm1hdG11bBoLbm9kZV9t"
    "YXRtdWwiBk1hdE11bAokCgZtYXRtdWwKBjIuYmlhcxIDYWRkGghub2RlX2FkZCIDQWRkCpUBCgZjb252MmQKCWJu"
    "LndlaWdodAoHYm4uYmlhcwoPYm4ucnVubmluZ19tZWFuCg5ibi5ydW5uaW5nX3ZhchIKYmF0Y2hfbm9ybRoPbm9k"
    "ZV9iYXRjaF9ub3JtIhJCYXRjaE5vcm1hbGl6YXRpb24qEQoHZXBzaWxvbhWsxSc3oAEBKhIKCG1vbWVudHVtFWZm"
    "Zj+gAQESCm1haW5fZ3JhcGgqFAggCAEIAwgDEAFCCDAud2VpZ2h0KgwIIBABQgYwLmJpYXMqEgiAAgiABBABQggx"
    "LndlaWdodCoNCIACEAFCBjEuYmlhc1ocCgVpbnB1dBITChEIARINCgcSBWJhdGNoCgIIQGIfCghsaW5lYXJfMhIT"
    "ChEIARINCgcSBWJhdGNoCgIICkIECgAQFA=="
)
GRAPH_DICT_SHA256 = "a6fe38fdf520444fc87743def1dcfd9f2f56557974e8a8cd1965f6481a53967c"


class ArchiveError(ValueError):
    """The bytes are not a readable compaas archive (wrong magic, version, corrupt, truncated)."""


# ----------------------------------------------------------------------------- bytes


def varint(n: int) -> bytes:
    if n < 0:
        raise ValueError("varint of a negative number")
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class _Reader:
    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ArchiveError(
                f"The archive is truncated: needed {n} byte(s) at offset {self.pos}, "
                f"{len(self.data) - self.pos} left."
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def f32(self) -> np.float32:
        return np.frombuffer(self.take(4), "<f4")[0]

    def varint(self) -> int:
        shift = result = 0
        while True:
            byte = self.u8()
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7
            if shift > 63:
                raise ArchiveError(f"Corrupt archive: overlong varint at offset {self.pos}.")


# ----------------------------------------------------------------------------- canonical Huffman


def huffman_lengths(freqs: np.ndarray, max_len: int = MAX_CODE_LEN) -> np.ndarray:
    """Code length per symbol (0 for unused symbols), at most `max_len` bits."""
    freqs = np.asarray(freqs, dtype=np.int64)
    lengths = np.zeros(len(freqs), dtype=np.int64)
    used = np.flatnonzero(freqs > 0)
    if len(used) == 0:
        return lengths
    if len(used) == 1:
        lengths[used[0]] = 1
        return lengths
    work = freqs.copy()
    while True:
        heap: list[tuple[int, int, list[int]]] = [
            (int(work[s]), i, [int(s)]) for i, s in enumerate(used)
        ]
        heapq.heapify(heap)
        depth = dict.fromkeys((int(s) for s in used), 0)
        tie = len(heap)
        while len(heap) > 1:
            fa, _, a = heapq.heappop(heap)
            fb, _, b = heapq.heappop(heap)
            for s in a + b:
                depth[s] += 1
            heapq.heappush(heap, (fa + fb, tie, a + b))
            tie += 1
        if max(depth.values()) <= max_len:
            for s, d in depth.items():
                lengths[s] = d
            return lengths
        work = np.where(work > 0, (work + 1) // 2, 0)  # flatten the distribution, retry


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical codes: symbols sorted by (length, symbol) get consecutive code values."""
    codes = np.zeros(len(lengths), dtype=np.int64)
    code = prev = 0
    for s in sorted(np.flatnonzero(lengths > 0), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[s]) - prev
        codes[s] = code
        prev = int(lengths[s])
        code += 1
    return codes


def _pack(codes: np.ndarray, lengths: np.ndarray) -> bytes:
    """Bit-pack variable-length codes, most significant bit first."""
    if len(codes) == 0:
        return b""
    width = max(int(lengths.max()), 1)
    shifts = np.arange(width - 1, -1, -1)
    bits = (codes[:, None] >> shifts[None, :]) & 1
    valid = shifts[None, :] < lengths[:, None]
    return np.packbits(bits[valid].astype(np.uint8)).tobytes()


def _bit_windows(payload: bytes, width: int) -> list[int]:
    """For every bit offset, the next `width` bits as an integer (zero-padded at the end)."""
    bits = np.unpackbits(np.frombuffer(payload, np.uint8)).astype(np.int64)
    bits = np.concatenate([bits, np.zeros(width, np.int64)])
    n = len(bits) - width
    windows = np.zeros(n + 1, np.int64)
    for j in range(width):
        windows = (windows << 1) | bits[j : j + n + 1]
    return list(windows.tolist())


def _decode_huffman(payload: bytes, lengths: np.ndarray, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, np.int64)
    used = np.flatnonzero(lengths > 0)
    if len(used) == 0:
        raise ArchiveError("Corrupt archive: a Huffman stream has no codes.")
    kraft = sum(2.0 ** -int(lengths[s]) for s in used)
    if kraft > 1.0 + 1e-12:
        raise ArchiveError("Corrupt archive: invalid Huffman code lengths.")
    width = int(lengths.max())
    codes = canonical_codes(lengths)
    table_sym = np.full(1 << width, -1, np.int64)
    table_len = np.zeros(1 << width, np.int64)
    for s in used:
        shift = width - int(lengths[s])
        lo = int(codes[s]) << shift
        table_sym[lo : lo + (1 << shift)] = s
        table_len[lo : lo + (1 << shift)] = lengths[s]
    windows = _bit_windows(payload, width)
    syms, lens = table_sym.tolist(), table_len.tolist()
    limit = len(payload) * 8
    out = [0] * count
    pos = 0
    for i in range(count):
        if pos >= limit:
            raise ArchiveError("Corrupt archive: a Huffman stream ends early.")
        w = windows[pos]
        if lens[w] == 0:
            raise ArchiveError("Corrupt archive: invalid Huffman code in a stream.")
        out[i] = syms[w]
        pos += lens[w]
    if pos > limit:
        raise ArchiveError("Corrupt archive: a Huffman stream ends early.")
    return np.asarray(out, np.int64)


def _decode_fixed(payload: bytes, width: int, count: int) -> np.ndarray:
    if width == 0:
        return np.zeros(count, np.int64)
    bits = np.unpackbits(np.frombuffer(payload, np.uint8))
    if len(bits) < width * count:
        raise ArchiveError("Corrupt archive: a fixed-width stream ends early.")
    grid = bits[: width * count].reshape(count, width).astype(np.int64)
    return grid @ (1 << np.arange(width - 1, -1, -1, dtype=np.int64))


def _pack_nibbles(values: np.ndarray) -> bytes:
    v = np.asarray(values, np.uint8)
    if len(v) % 2:
        v = np.append(v, 0)
    return ((v[0::2] << 4) | v[1::2]).astype(np.uint8).tobytes()


def _unpack_nibbles(data: bytes, n: int) -> np.ndarray:
    b = np.frombuffer(data, np.uint8)
    return np.stack([b >> 4, b & 15], 1).ravel()[:n].astype(np.int64)


def encode_stream(symbols: np.ndarray, alphabet: int, huffman: bool = True) -> bytes:
    """One symbol stream: fixed-width or canonical Huffman, whichever is smaller (huffman=True).

    Layout: mode u8; fixed → width u8; Huffman → varint alphabet, ceil(alphabet/2) bytes of
    4-bit code lengths. Then varint payload length and the MSB-first bit payload. The symbol
    count is known to the reader from elsewhere.
    """
    symbols = np.asarray(symbols, np.int64)
    if len(symbols) and (symbols.min() < 0 or symbols.max() >= alphabet):
        raise ValueError("symbol outside the alphabet")
    width = int(max(alphabet - 1, 0)).bit_length()
    payload = _pack(symbols, np.full(len(symbols), width, np.int64)) if width else b""
    best = bytes([STREAM_FIXED, width]) + varint(len(payload)) + payload
    if huffman and len(symbols):
        lengths = huffman_lengths(np.bincount(symbols, minlength=alphabet))
        codes = canonical_codes(lengths)
        payload = _pack(codes[symbols], lengths[symbols])
        table = varint(alphabet) + _pack_nibbles(lengths)
        coded = bytes([STREAM_HUFFMAN]) + table + varint(len(payload)) + payload
        if len(coded) < len(best):
            best = coded
    return best


def decode_stream(reader: _Reader, count: int, alphabet: int | None = None) -> np.ndarray:
    mode = reader.u8()
    if mode == STREAM_FIXED:
        width = reader.u8()
        if width > 32:
            raise ArchiveError(f"Corrupt archive: fixed-width stream of {width} bits.")
        payload = reader.take(reader.varint())
        out = _decode_fixed(payload, width, count)
    elif mode == STREAM_HUFFMAN:
        n = reader.varint()
        if n > 1 << 20:
            raise ArchiveError("Corrupt archive: Huffman alphabet too large.")
        lengths = _unpack_nibbles(reader.take((n + 1) // 2), n)
        payload = reader.take(reader.varint())
        out = _decode_huffman(payload, lengths, count)
    else:
        raise ArchiveError(f"Corrupt archive: unknown stream mode {mode}.")
    if alphabet is not None and len(out) and out.max() >= alphabet:
        raise ArchiveError("Corrupt archive: a symbol is outside its alphabet.")
    return out


# ----------------------------------------------------------------------------- positions


def gap_symbols(positions: np.ndarray, cap: int) -> np.ndarray:
    """Zero runs before each nonzero (flattened, C order); runs ≥ cap emit filler symbol `cap`.

    Symbol r < cap: skip r zeros, then the next element is a nonzero. Symbol cap: skip cap
    zeros, no nonzero yet (Deep Compression's filler, without storing a filler weight).
    """
    runs = np.diff(np.concatenate([[-1], np.asarray(positions, np.int64)])) - 1
    fillers = runs // cap
    rests = runs - fillers * cap
    total = int(fillers.sum()) + len(runs)
    out = np.full(total, cap, np.int64)
    ends = np.cumsum(fillers + 1) - 1  # each run's own symbol comes after its fillers
    out[ends] = rests
    return out


def gap_positions(symbols: np.ndarray, cap: int) -> np.ndarray:
    symbols = np.asarray(symbols, np.int64)
    filler = symbols == cap
    advance = np.where(filler, cap, symbols + 1)
    return (np.cumsum(advance) - 1)[~filler]


# ----------------------------------------------------------------------------- values


def uniform_values(lo: np.float32, step: np.float32, q: np.ndarray) -> np.ndarray:
    """The float32 values of linear levels q: lo + q·step, in float32 (encoder and decoder)."""
    return (np.float32(lo) + np.asarray(q).astype(np.float32) * np.float32(step)).astype(np.float32)


@dataclass
class Shared:
    """A k-means shared tensor: values = codebook[indices] at positions, zero elsewhere."""

    index: int  # position of the initializer in graph.initializer
    shape: tuple[int, ...]
    bits: int
    codebook: np.ndarray  # sorted, float16 (or float32 when fp16 cannot hold it)
    positions: np.ndarray  # flat positions of the coded (nonzero) elements, ascending
    indices: np.ndarray  # codebook index per coded element
    huffman: bool = True
    report: dict[str, Any] = field(default_factory=dict)

    def values(self) -> np.ndarray:
        out = np.zeros(int(np.prod(self.shape)), np.float32)
        out[self.positions] = self.codebook.astype(np.float32)[self.indices]
        return out.reshape(self.shape)


@dataclass
class Uniform:
    """A linearly quantized tensor: values = lo + q·step (float32)."""

    index: int
    shape: tuple[int, ...]
    bits: int
    lo: np.float32
    step: np.float32
    q: np.ndarray
    huffman: bool = True
    report: dict[str, Any] = field(default_factory=dict)

    def values(self) -> np.ndarray:
        return uniform_values(self.lo, self.step, self.q).reshape(self.shape)


Record = Shared | Uniform


def _encode_shared(rec: Shared) -> bytes:
    size = int(np.prod(rec.shape))
    nnz = len(rec.positions)
    k = len(rec.codebook)
    fp32 = rec.codebook.dtype != np.float16
    dense = nnz == size
    flags = (FLAG_DENSE if dense else 0) | (FLAG_FP32_CODEBOOK if fp32 else 0)
    book = rec.codebook.astype("<f4" if fp32 else "<f2").tobytes()
    positions = b""
    indices_in_order = rec.indices
    if not dense and nnz:
        options = []
        rows = rec.shape[0] if len(rec.shape) >= 2 else 1
        orders = [(0, rec.positions)]
        if rows > 1:
            r, c = np.divmod(rec.positions, size // rows)
            orders.append((FLAG_TRANSPOSED, np.sort(c * rows + r)))
        for flag, order in orders:
            for cap in GAP_CAPS:
                syms = gap_symbols(order, cap)
                stream = encode_stream(syms, cap + 1, rec.huffman)
                options.append((flag, varint(cap) + varint(len(syms)) + stream))
        flag, positions = min(options, key=lambda o: len(o[1]))
        flags |= flag
        if flag:  # indices follow the order the positions are stored in
            r, c = np.divmod(rec.positions, size // rows)
            indices_in_order = rec.indices[np.argsort(c * rows + r, kind="stable")]
    head = bytes([KIND_SHARED, rec.bits, flags]) + varint(k) + book + varint(nnz)
    indices = encode_stream(indices_in_order, max(k, 1), rec.huffman)
    rec.report.update(
        codebook_bytes=len(book),
        position_bytes=len(positions),
        index_bytes=len(indices),
        bytes=len(head) + len(positions) + len(indices) + len(varint(rec.index)),
    )
    return head + positions + indices


def _decode_shared(r: _Reader, shape: tuple[int, ...]) -> np.ndarray:
    size = int(np.prod(shape))
    bits, flags = r.u8(), r.u8()
    del bits
    k = r.varint()
    if k > size + 1 or k > 1 << 24:
        raise ArchiveError("Corrupt archive: codebook larger than its tensor.")
    fp32 = bool(flags & FLAG_FP32_CODEBOOK)
    book = np.frombuffer(r.take(k * (4 if fp32 else 2)), "<f4" if fp32 else "<f2")
    nnz = r.varint()
    if nnz > size:
        raise ArchiveError("Corrupt archive: more coded elements than the tensor holds.")
    if flags & FLAG_DENSE:
        if nnz != size:
            raise ArchiveError("Corrupt archive: a dense tensor with missing elements.")
        positions = np.arange(size)
    elif nnz:
        cap = r.varint()
        if cap < 1:
            raise ArchiveError("Corrupt archive: gap cap 0.")
        positions = gap_positions(decode_stream(r, r.varint(), cap + 1), cap)
        if len(positions) != nnz or (nnz and positions[-1] >= size):
            raise ArchiveError("Corrupt archive: positions do not fit the tensor.")
        if flags & FLAG_TRANSPOSED:  # column-major order back to row-major flat positions
            rows = shape[0] if len(shape) >= 2 else 1
            c, r_ = np.divmod(positions, rows)
            positions = r_ * (size // rows) + c
    else:
        positions = np.zeros(0, np.int64)
    indices = decode_stream(r, nnz, max(k, 1))
    if nnz and k == 0:
        raise ArchiveError("Corrupt archive: coded elements without a codebook.")
    out = np.zeros(size, np.float32)
    out[positions] = book.astype(np.float32)[indices]
    return out.reshape(shape)


def _encode_uniform(rec: Uniform) -> bytes:
    head = bytes([KIND_UNIFORM, rec.bits]) + struct.pack("<ff", rec.lo, rec.step)
    stream = encode_stream(rec.q, 1 << rec.bits, rec.huffman)
    rec.report.update(bytes=len(head) + len(stream) + len(varint(rec.index)))
    return head + stream


def _decode_uniform(r: _Reader, shape: tuple[int, ...]) -> np.ndarray:
    bits = r.u8()
    if not 1 <= bits <= 16:
        raise ArchiveError(f"Corrupt archive: uniform tensor with {bits} bits.")
    lo, step = r.f32(), r.f32()
    q = decode_stream(r, int(np.prod(shape)), 1 << bits)
    return uniform_values(lo, step, q).reshape(shape)


# ----------------------------------------------------------------------------- archive


def _graph_dict() -> Any:
    import base64
    import hashlib

    import zstandard

    raw = base64.b64decode("".join(GRAPH_DICT_B64))
    assert hashlib.sha256(raw).hexdigest() == GRAPH_DICT_SHA256
    return zstandard.ZstdCompressionDict(raw, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


def strip_model(model: Any) -> Any:
    """Drop what the runtime does not need (node metadata/doc strings, value_info), in place.

    The step's dense ONNX and the archive both carry the stripped graph, so the model decoded
    from an archive is byte-identical to the dense ONNX the job measured.
    """
    graph = model.graph
    for node in graph.node:
        node.ClearField("metadata_props")
        node.ClearField("doc_string")
    graph.ClearField("value_info")
    graph.ClearField("doc_string")
    for value in [*graph.input, *graph.output]:
        value.ClearField("doc_string")
        value.ClearField("metadata_props")
    for init in graph.initializer:
        init.ClearField("doc_string")
        init.ClearField("metadata_props")
    model.ClearField("doc_string")
    return model


def _clear_data(init: Any) -> None:
    for name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
        init.ClearField(name)


def encode(model: Any, records: list[Record]) -> tuple[bytes, dict[str, Any]]:
    """The archive bytes for `model` (a ModelProto, not modified) with `records` coded.

    The coded initializers must be float32; their data is removed from the stored graph.
    Returns the bytes and a size breakdown.
    """
    import onnx
    import zstandard

    graph_model = onnx.ModelProto()
    graph_model.CopyFrom(model)
    inits = graph_model.graph.initializer
    seen: set[int] = set()
    for rec in records:
        if rec.index in seen or not 0 <= rec.index < len(inits):
            raise ValueError(f"bad initializer index {rec.index}")
        seen.add(rec.index)
        if inits[rec.index].data_type != onnx.TensorProto.FLOAT:
            raise ValueError(f"initializer {inits[rec.index].name} is not float32")
        _clear_data(inits[rec.index])
    compressor = zstandard.ZstdCompressor(
        level=GRAPH_ZSTD_LEVEL,
        dict_data=_graph_dict(),
        write_content_size=True,
        write_dict_id=False,
    )
    graph = compressor.compress(graph_model.SerializeToString())
    body = bytearray(varint(len(graph)) + graph + varint(len(records)))
    for rec in records:
        body += varint(rec.index)
        body += _encode_shared(rec) if isinstance(rec, Shared) else _encode_uniform(rec)
    data = MAGIC + bytes([VERSION]) + struct.pack("<I", zlib.crc32(body)) + bytes(body)
    sizes = {"header_bytes": 8, "graph_bytes": len(graph) + len(varint(len(graph)))}
    return data, sizes


def decode(data: bytes) -> Any:
    """The ONNX ModelProto an archive holds; ArchiveError if it is not a valid archive."""

    if len(data) < 8 or data[:3] != MAGIC:
        raise ArchiveError("Not a compaas archive (the file does not start with 'CPZ').")
    version = data[3]
    if version != VERSION:
        raise ArchiveError(
            f"Archive format version {version} is not supported by this decoder "
            f"(it reads version {VERSION}); use a compaas release that matches the archive."
        )
    (crc,) = struct.unpack("<I", data[4:8])
    if zlib.crc32(data[8:]) != crc:
        raise ArchiveError(
            "The archive is corrupt or truncated: its CRC-32 checksum does not match "
            f"({len(data)} bytes read). Download it again."
        )
    try:
        return _decode_body(data)
    except ArchiveError:
        raise
    except (ValueError, IndexError, OverflowError, MemoryError) as exc:
        raise ArchiveError(f"Corrupt archive: {type(exc).__name__}: {exc}") from exc


def _decode_body(data: bytes) -> Any:
    import onnx
    import zstandard

    r = _Reader(data, 8)
    try:
        raw = zstandard.ZstdDecompressor(dict_data=_graph_dict()).decompress(r.take(r.varint()))
    except zstandard.ZstdError as exc:
        raise ArchiveError(f"Corrupt archive: the graph does not decompress ({exc}).") from exc
    model = onnx.ModelProto()
    try:
        model.ParseFromString(raw)
    except Exception as exc:
        raise ArchiveError("Corrupt archive: the graph is not an ONNX ModelProto.") from exc
    inits = model.graph.initializer
    for _ in range(r.varint()):
        index = r.varint()
        if index >= len(inits):
            raise ArchiveError(f"Corrupt archive: initializer index {index} out of range.")
        init = inits[index]
        shape = tuple(int(d) for d in init.dims)
        if any(d < 0 for d in shape) or int(np.prod(shape, dtype=np.float64)) > 1 << 31:
            raise ArchiveError(f"Corrupt archive: initializer {init.name} has shape {shape}.")
        kind = r.u8()
        if kind == KIND_SHARED:
            values = _decode_shared(r, shape)
        elif kind == KIND_UNIFORM:
            values = _decode_uniform(r, shape)
        else:
            raise ArchiveError(f"Corrupt archive: unknown tensor kind {kind}.")
        init.raw_data = np.ascontiguousarray(values, "<f4").tobytes()
    if r.pos != len(data):
        raise ArchiveError(f"Corrupt archive: {len(data) - r.pos} unexpected trailing byte(s).")
    return model


def decode_file(archive: str | Path, output: str | Path) -> Any:
    """Decode an archive file and write the ONNX model to `output`; returns the ModelProto."""
    import onnx

    model = decode(Path(archive).read_bytes())
    onnx.save(model, str(output))
    return model
