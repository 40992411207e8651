"""AI-text detection: a fine-tuned classifier (backbone + two-label head, saved as transformers'
`…ForSequenceClassification` with labels human/machine) and zero-shot scores (Fast-DetectGPT, Binoculars), judged
by AUROC and TPR at 1% FPR overall, per language and on short texts.

Modules: `texts` (reading, balance, truncation, batches), `classifier` (model, save, load, P(machine)), `train`
(on danlu.engine), `zeroshot`, `generate` (machine text from a checkpoint or endpoint), `metrics`.
"""
