"""Evaluation: bits-per-byte, multiple choice, generative exact match, the world corpus' held-out sets, reports."""
