"""The compression ops. Importing this package registers every built-in handler."""

from engine.ops import (  # noqa: F401  (handlers register on import)
    auto,
    low_rank,
    training,
    weight_share,
)
from engine.ops.prune import onnx_weights, torch_model  # noqa: F401
from engine.ops.quantize import handler, qat  # noqa: F401
