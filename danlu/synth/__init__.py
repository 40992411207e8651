"""Data a teacher model makes: Self-Instruct instructions with answers, answers to given prompts (sequence-level
distillation), and Magpie user turns.

Layers, bottom up: rouge (ROUGE-L, zh by characters / en by words) and filters; teacher (the interface) with
endpoint (an OpenAI-compatible API: concurrency, timeouts, retries, rate limit) and local (a checkpoint, batched);
prompts (reading prompt and seed files); store (resumable output and its journal); loop (answering, filtering and
committing a round); and the generators instruct, answer, magpie. Rows are OpenAI `messages` plus `meta`
(teacher, kind, prompt, filters passed); rejected rows go to the journal with the filter they failed.
"""
