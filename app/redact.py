"""Absolute filesystem paths never reach a client: they become the file's own name."""

from __future__ import annotations

import re

# A path of two or more components starting at the filesystem root, not inside a URL and not
# one of the API's own routes (/v1/..., which details cite as instructions).
_ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~-])/(?!v1/)(?:[\w.@+~-]+/)+([\w.@+~-]*)")


def relative_paths(text: str) -> str:
    """`/srv/compaas/var/tmp/ab12/model.onnx` → `model.onnx`, wherever it appears in `text`."""
    return _ABSOLUTE_PATH.sub(lambda m: m.group(1) or ".", text.replace("file://", ""))
