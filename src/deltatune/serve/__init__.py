"""`deltatune serve`: an OpenAI-compatible HTTP server for finished runs (docs/serving.md).

``engine``: loads bases once, attaches deltas by name (``loading``), batches requests in one worker
thread (``batching``: dynamic batching for classify/embeddings/score, step-level batching for
generation, ``generation``); ``requests``: a request's way back to the event loop.
``types``: what the engine and the HTTP layer share (errors, Served, Sampling, Chunk, the interface).
``app``: the FastAPI application (endpoints, OpenAI shapes, keys, limits, metrics) on an engine;
``auth``: API keys and rate limits; ``metrics``: /metrics; ``config``: the serve config (YAML,
validated like training configs). app, auth, config and metrics never import engine (import-linter).
``server``: uvicorn, signals (SIGTERM drains, SIGHUP reloads), ``deltatune serve``.
"""
