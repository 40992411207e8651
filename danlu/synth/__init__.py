"""Data a teacher model makes: Self-Instruct instructions with answers, answers to given prompts (sequence-level
distillation), and Magpie user turns.

Layers, bottom up: rouge (ROUGE-L, zh by characters / en by words) and filters; teacher (the interface) with
endpoint (an OpenAI-compatible API: concurrency, timeouts, retries, rate limit) and local (a checkpoint, batched);
prompts (reading prompt and seed files); store (resumable output and its journal); loop (answering, filtering and
committing a round); the generators instruct, answer, magpie; and experiment with students (does the data help a
student: the `synth` stage and benchmarks/synth_experiment.py). Rows are OpenAI `messages` plus `meta`
(teacher, kind, prompt, filters passed); rejected rows go to the journal with the filter they failed.
"""
