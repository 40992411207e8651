"""Serving: an OpenAI-compatible API, a web chat page, built-in tools, and the feedback loop.

Modules: schemas (request shapes), engine (generation worker thread), chat (one answer: context, tools,
fallback), routing (named models, confidence fallback), memory (correction memory), feedback (SQLite store and
export), app (FastAPI routes), server (uvicorn runners), static/index.html (the page).
"""
