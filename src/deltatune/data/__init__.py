"""Data: load tables, check them, split, and tokenize for a task."""

from .examples import IGNORE, PreparedData, prepare, prompt_text
from .load import load_table

__all__ = ["IGNORE", "PreparedData", "prepare", "prompt_text", "load_table"]
