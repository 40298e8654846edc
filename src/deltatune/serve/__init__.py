"""`deltatune serve`: an OpenAI-compatible HTTP server for finished runs (docs/serving.md).

``engine``: loads bases once, attaches deltas by name (``loading``), batches requests in one worker
thread (``batching``: dynamic batching for classify/embeddings/score, step-level batching for
generation, ``generation``); ``requests``: a request's way back to the event loop, and the refusals.
``app``: the FastAPI application (endpoints, OpenAI shapes, keys, limits, metrics) on an engine.
``config``: the serve config (YAML, validated like training configs).
"""
