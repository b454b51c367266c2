"""compaas engine: a plain library that loads, compresses, evaluates and exports models.

No web, queue, database or settings imports here. Heavy modules (torch, onnxruntime) are imported
by the submodules that need them, so `engine.config` stays importable without torch.
"""
