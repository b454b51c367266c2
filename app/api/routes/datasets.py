from __future__ import annotations

from app.api.uploaded import uploaded_router
from app.schemas.datasets import DatasetRead
from app.services.datasets import DATASETS

router = uploaded_router(
    DATASETS,
    DatasetRead,
    "Upload a .npz or .safetensors dataset: one array per model input plus optional labels.",
)
