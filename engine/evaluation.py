"""How results are evaluated: the sample budget every fidelity measurement uses."""

from __future__ import annotations

# Samples every evaluation draws from the job's data (the pipeline's step metrics and the
# quantizer's target checks alike, so a target met in the search is met in the step metrics).
EVAL_SAMPLES = 2000
