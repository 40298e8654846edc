"""deltatune: fine-tune language models locally; a tuned model is the base plus a small delta."""

__version__ = "0.1.0"
