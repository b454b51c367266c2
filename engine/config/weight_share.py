"""The weight_share op's config: per-layer k-means codebooks and Huffman coding."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from engine.config.base import OpConfig


class WeightShareConfig(OpConfig):
    """Deep Compression weight sharing: per-layer k-means codebooks + Huffman coding.

    Every Conv/Gemm/MatMul weight (≥ 2-D initializer, not matched by `ignore`) gets a codebook
    of at most 2^bits centroids, fitted with k-means on its nonzero weights (zeros stay exactly
    zero: they are the pruned positions). The step's ONNX holds the shared values densely; the
    `cpz` archive beside it stores codebooks, Huffman-coded indices and Huffman-coded sparse
    positions (docs/archive-format.md). Biases of those layers are stored as `bias_bits`
    linear levels (0 keeps them float32 inside the compressed graph).
    """

    op: Literal["weight_share"] = "weight_share"
    bits: int = Field(5, ge=1, le=8, description="codebook index bits per layer")
    scope: Literal["layer"] = "layer"
    init: Literal["linear", "density", "random"] = "linear"
    iterations: int = Field(30, ge=0, le=1000, description="k-means (Lloyd) iterations")
    ignore: list[str] = Field(default_factory=list, description="layer/weight name patterns")
    huffman: bool = True
    bias_bits: int = Field(8, ge=0, le=16, description="bias levels; 0 keeps float32")

    @model_validator(mode="after")
    def _bias_bits_range(self) -> WeightShareConfig:
        if self.bias_bits == 1:
            raise ValueError("bias_bits must be 0 (keep float32) or 2..16")
        return self
