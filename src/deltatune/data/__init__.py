"""Data: load tables, check them, clean, split, and tokenize into the examples a task asks for."""

from .examples import IGNORE, PreparedData, prompt_text
from .load import load_table

__all__ = ["IGNORE", "PreparedData", "prompt_text", "load_table"]
