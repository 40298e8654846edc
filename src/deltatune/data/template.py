"""Jinja2 templates that build a row's columns from its other columns.

``data.templates: {prompt: "Review: {{ text }}\\nSentiment:", response: " {{ label }}"}`` writes
``prompt`` and ``response`` for every row. ``data.format: instruction`` is the Alpaca preset over
``instruction`` / ``input`` / ``output`` columns. Templates run sandboxed with strict
undefined variables, so a typo names the column instead of rendering an empty string.
"""

from __future__ import annotations

from jinja2 import StrictUndefined, TemplateSyntaxError, meta
from jinja2.sandbox import SandboxedEnvironment

from ..errors import ConfigError, DataError
from .load import ROW

INSTRUCTION = {"prompt": "{{ instruction }}{% if input %}\n\n{{ input }}{% endif %}", "response": "{{ output }}"}


def templates_for(data_cfg) -> dict[str, str]:
    """The templates a config asks for: the instruction preset, then any given explicitly."""
    preset = INSTRUCTION if data_cfg.format == "instruction" else {}
    return {**preset, **data_cfg.templates}


class Templates:
    def __init__(self, templates: dict[str, str]):
        env = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True,
                                   finalize=lambda v: "" if v is None else v)
        self.compiled, self.variables = {}, set()
        for column, source in templates.items():
            try:
                self.compiled[column] = env.from_string(source)
                self.variables |= meta.find_undeclared_variables(env.parse(source))
            except TemplateSyntaxError as exc:
                raise ConfigError([f"data.templates.{column}: invalid Jinja2 template ({exc.message}, "
                                   f"line {exc.lineno})"]) from exc

    def check_columns(self, rows: list[dict], path: str) -> None:
        missing = sorted(v for v in self.variables if v not in rows[0])
        if missing:
            present = ", ".join(c for c in rows[0] if not c.startswith("_"))
            raise DataError(f"{path}: data.templates use column(s) {', '.join(missing)} that the file does "
                            f"not have (it has: {present}); fix the template or the file")

    def render(self, row: dict) -> str | None:
        """Fill the templated columns of ``row`` in place; returns a reason when a row cannot be."""
        values = {k: v for k, v in row.items() if not k.startswith("_")}
        rendered = {}
        for column, template in self.compiled.items():
            try:
                rendered[column] = template.render(values)
            except Exception as exc:  # a template error is about this row's values
                return f"template for {column!r} failed on row {row[ROW]}: {exc}"
        row.update(rendered)
        return None
