"""`deltatune serve`: an OpenAI-compatible HTTP server for finished runs (docs/serving.md).

``engine``: loads bases once, attaches deltas by name, batches requests per base (a scheduler per
base: dynamic batching for classify/embeddings/score, step-level batching for generation).
``app``: the FastAPI application (endpoints, OpenAI shapes, keys, limits, metrics) on an engine.
``config``: the serve config (YAML, validated like training configs).
"""
