"""Compression: a smaller model that keeps what a bigger one knows (Minitron's recipe, measured step by step).

subset (calibration / distillation texts) → importance (activations on the subset) → prune (width, depth) →
distill (KL to the teacher's logits on the engine) → quantize (int8 / int4 weight-only, GGUF through the export).
Beside the chain: baseline (the same shape trained from scratch on the same tokens, the control), and two measured
options, lowrank (activation-aware SVD) and share (adjacent blocks share weights). `measure` makes one report row
per model (sizes counts what is actually held); `pipeline` wires it all for `danlu compress` and the `compress` stage.
"""
