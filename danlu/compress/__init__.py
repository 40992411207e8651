"""Compression: a smaller model that keeps what a bigger one knows (Minitron's recipe, measured step by step).

subset (calibration / distillation texts) → importance (activations on the subset) → prune (width, depth) →
distill (KL to the teacher's logits on the engine) → quantize (int8 / int4 weight-only). `pipeline` wires them and
reports parameters, bytes, held-out bits-per-byte and accuracy after each step; `danlu compress` and the `compress`
stage call it.
"""
