"""Serving: an OpenAI-compatible API, a web chat page, built-in tools, and the feedback loop.

Modules: schemas (request shapes), engine (the generation loop: continuous batching, a worker thread),
engine_process (that loop in a process of its own, what `danlu serve` runs), chat (one answer: context, tools,
fallback), routing (named models, confidence fallback), memory (correction memory), feedback (SQLite store and
export), app (FastAPI routes), server (uvicorn runners), static/index.html (the page).
"""
