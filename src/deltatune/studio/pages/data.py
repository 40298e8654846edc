"""Data: choose a file under the data root (or a packaged data set, or upload one), see what ``deltatune data
inspect`` sees, then the data report the training pipeline would write (duplicates, leaks, personal data,
label balance, token lengths) before any training."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse

from ... import assets
from ... import html_report as hr
from ...data.report import inspect_file, report_sections
from ...errors import DeltatuneError
from ..datafiles import data_files, guess_task, report_for, save_upload, upload_target
from ..layout import esc, render, section, select, table
from ..security import confined
from . import Page

router = APIRouter()
PAGE = Page("data", router, ("Data", "/data"))
COLUMNS = {"classification": ("text_column", "label_column"), "causal_lm": ("prompt_column", "response_column"),
           "seq2seq": ("prompt_column", "response_column"), "token_classification": ("tokens_column", "tags_column")}
DEFAULTS = {"text_column": "text", "label_column": "label", "prompt_column": "prompt", "response_column": "response",
            "tokens_column": "tokens", "tags_column": "tags"}


def _packaged(kind: str) -> list[str]:
    return [name for name, k, _, state in assets.status() if k == kind and state == "ready" and
            (kind == "model" or name in assets.DATASETS)]


def _source(request: Request, file: str, asset: str) -> tuple[str, str, str]:
    """(what to read, its name on the page, the query that names it) for a file under the data root or a
    packaged data set; anything else is refused."""
    if asset:
        if asset not in assets.DATASETS:
            raise HTTPException(404, f"no packaged data set {asset[:40]!r}; the Data page lists them")
        return str(assets.resolve_data(asset)), f"packaged data set {asset}", f"asset={quote(asset)}"
    path = confined(request.app.state.settings.data_root, file, "file")
    if not path.is_file():
        raise HTTPException(404, f"no file {file} under the data root")
    return str(path), file, f"file={quote(file)}"


def _chooser(request: Request, file: str, asset: str) -> str:
    root = request.app.state.settings.data_root
    files = data_files(root)
    options = [("", "choose a file")] + [(f, f) for f in files]
    packaged = [("", "none")] + [(n, n) for n in _packaged("data")]
    limit = request.app.state.settings.max_upload_bytes / 2**20
    return ('<form class="filters" method="get" action="/data">'
            + select("file", f"File under {root}", options, file)
            + select("asset", "Or a packaged data set", packaged, asset)
            + '<button type="submit" class="primary">Inspect</button></form>'
            + ("" if files else f'<p class="none">No .csv, .tsv, .json, .jsonl or .parquet files under {esc(root)}.</p>')
            + '<form class="filters upload" id="upload" data-limit="'
            f'{request.app.state.settings.max_upload_bytes}"><label class="field"><span>Upload a file '
            f"(into uploads/, at most {limit:.0f} MB)</span><input type=\"file\" name=\"upload\" "
            'accept=".csv,.tsv,.json,.jsonl,.parquet"></label><button type="submit">Upload</button>'
            '<span class="small" role="status" data-upload-note></span></form>')


def _inspect(summary: dict) -> str:
    facts = hr.facts([("Rows", "rows", summary["rows"]), ("Malformed lines", "malformed_rows", summary["malformed_rows"]),
                      ("Exact duplicate rows", "exact_duplicate_rows", summary["exact_duplicate_rows"])])
    rows = [[f"<b>{esc(name)}</b>", esc(c["type"]), hr.count(c["missing"]), hr.count(c["distinct"]),
             esc(c.get("chars", "–")), hr.value(c.get("top")) if c.get("top") else '<span class="none">many</span>']
            for name, c in summary["columns"].items()]
    cols = table(["column", "type", "missing", "distinct values", "characters p50 / p95 / max", "most common values"],
                 rows, {2, 3, 4})
    problems = "".join(f"<li>line {esc(p.get('row'))}: {esc(p.get('reason'))}</li>" for p in summary["first_problems"])
    said = ("What <code>deltatune data inspect</code> sees: rows, malformed lines, exact duplicates, and per column "
            "its type, missing and distinct values, lengths and, for a column with few values, its counts.")
    return section("Inspect", said, facts + cols + (f"<h3>First problems</h3><ul>{problems}</ul>" if problems else ""))


def _report_form(query: str, columns: list[str], task: str, chosen: dict[str, str], model: str) -> str:
    tasks = [(t, t) for t in COLUMNS]
    models = [(m, f"{m} (token lengths)") for m in _packaged("model")] + [("", "none (no token lengths)")]
    fields = "".join(f'<label class="field"><span>{esc(k.replace("_", " "))}</span><input name="{k}" '
                     f'value="{esc(chosen.get(k, DEFAULTS[k]))}" list="columns"></label>' for k in DEFAULTS
                     if k in COLUMNS[task])
    hidden = "".join(f'<input type="hidden" name="{esc(k)}" value="{esc(v)}">' for k, v in
                     (p.split("=", 1) for p in query.split("&")))
    options = "".join(f'<option value="{esc(c)}">' for c in columns)
    return (f'<form class="filters" method="get" action="/data#report">{hidden}'
            + select("task", "Task", tasks, task, 'data-submit-on-change') + fields
            + select("model", "Tokenizer", models, model)
            + f'<datalist id="columns">{options}</datalist><input type="hidden" name="report" value="1">'
            '<button type="submit" class="primary">Make the data report</button></form>')


@router.get("/data")
def data_page(request: Request, file: str = "", asset: str = "", task: str = "", model: str = "minilm",
              report: str = ""):
    lead = hr.means("Look at a data file before training on it. The file is only read: nothing is trained "
                    "and nothing is written.")
    if not file and not asset:
        return render(request, "Data", _chooser(request, file, asset), active="data", lead=lead)
    ref, name, query = _source(request, file, asset)
    try:
        summary = inspect_file(ref)
    except DeltatuneError as exc:
        return render(request, "Data", _chooser(request, file, asset) + _cannot(str(exc)), active="data", lead=lead)
    columns = list(summary["columns"])
    task = task if task in COLUMNS else guess_task(columns)
    chosen = {k: request.query_params.get(k, DEFAULTS[k]) for k in COLUMNS[task]}
    model = model if model in _packaged("model") else ""
    body = _chooser(request, file, asset) + _inspect(summary) + section(
        "Data report", "What the training pipeline would do with this file: rows kept and dropped, duplicates, "
        "evaluation rows that repeat training rows (leaks), personal data found, label balance and token lengths. "
        "Choose the task and the columns it reads.", _report_form(query, columns, task, chosen, model)
        + (_report(ref, (ref, _stamp(ref), task, tuple(chosen.items()), model), task, chosen, model)
           if report else ""), anchor="report")
    return render(request, "Data", body, active="data", meta=[("Data", name)], lead=lead)


def _stamp(ref: str) -> tuple:
    stat = Path(ref).stat()
    return stat.st_mtime_ns, stat.st_size


def _report(ref: str, key: tuple, task: str, columns: dict[str, str], model: str) -> str:
    if Path(ref).stat().st_size > 200 * 2**20:
        return _cannot("the file is larger than 200 MB: make its report with `deltatune data prepare --stream` in a "
                       "terminal")
    try:
        return f'<div class="report">{report_sections(report_for(ref, key, task, columns, model))}</div>'
    except DeltatuneError as exc:
        return _cannot(str(exc))


def _cannot(message: str) -> str:
    return (f'<div class="problem" role="alert"><p>{esc(message)}</p><p><b>What to do:</b> the message says what '
            "does not fit; choose other columns or another task, or fix the file.</p></div>")


@router.post("/data/upload")
async def upload(request: Request):
    """The request body (a data file; its name in the X-Filename header) into the data root's uploads/."""
    settings = request.app.state.settings
    try:
        target = upload_target(settings.data_root, request.headers.get("x-filename", ""))
        written = await save_upload(request, target, settings.max_upload_bytes)
    except HTTPException as exc:  # the page's script shows the message
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)
    name = str(target.relative_to(settings.data_root))
    return JSONResponse({"file": name, "bytes": written, "url": f"/data?file={quote(name)}"})
