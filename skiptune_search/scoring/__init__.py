"""Scoring: how a schedule becomes a number.

``task`` (what every trial of a study samples and how it is scored), ``evaluator`` (the model,
controller, extractor and reference loaded once; ``Evaluator.score`` is the one place a schedule
is scored, rung by rung), ``metrics`` (features, FID and KID through torch-fidelity),
``heldout`` (a schedule's gain on held-out seeds, with an interval), ``objectives`` (what a study
minimizes: the objective registry). The names below, and the objectives, are plain data, so the
CLI lists its choices without loading torch.
"""

# feature extractor -> the torch-fidelity feature layer FID and KID are computed on
FEATURE_LAYERS = {"efficientnet-lite0": "1280", "inception-v3-compat": "2048"}
DEFAULT_FEATURES = "efficientnet-lite0"  # offline, from a PyPI wheel
# what the model's forward runs in: fp32, or bf16 autocast (convolutions and matmuls in bf16; the
# sampler's updates, FID features and statistics stay fp32); value: the torch dtype's name
PRECISIONS = {"fp32": None, "bf16": "bfloat16"}
