"""The long fuzzing campaign: config files and data files through the command line, in-process.

    python benchmarks/fuzz.py [--configs 6000] [--data 4000] [--out benchmarks/results/fuzz.json]

The cases come from the same generators as the bounded property tests in ``make test``
(tests/fuzz_cases.py): ``deltatune validate`` on generated YAML (odd values, unknown keys, anchors,
tags, duplicate keys, other top-levels, binary), and ``deltatune data prepare`` on generated
CSV/TSV/JSON/JSONL/Parquet files (control characters, encodings, ragged rows, types, sizes). Each
case must end in exit 0 with consistent output or exit 2 with our message; every other ending
(traceback, other exit code, hang over 30 s, half-written output) is counted as a defect, with its
first line and one reproducer. Results go to RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hypothesis import HealthCheck, given, settings  # noqa: E402

from tests.conftest import make_tiny_bert  # noqa: E402
from tests.fuzz_cases import config_texts, data_files, prepare_case, scratch, validate_case  # noqa: E402


def campaign(name: str, strategy, run, n: int, outcomes: Counter, defects: dict) -> None:
    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def one(case):
        folder = scratch()
        try:
            outcomes[f"{name}: {run(case, folder)}"] += 1
        except Exception as exc:  # noqa: BLE001  (a defect: counted, one reproducer kept per kind)
            kind = f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            outcomes[f"{name}: DEFECT"] += 1
            defects.setdefault(kind, {"count": 0, "case": repr(case)[:1500]})["count"] += 1
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    one()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", type=int, default=6000)
    ap.add_argument("--data", type=int, default=4000)
    ap.add_argument("--out", default="benchmarks/results/fuzz.json")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="deltatune-fuzz-campaign-"))
    os.environ["DELTATUNE_REGISTRY"] = str(work / "registry.sqlite")
    model = make_tiny_bert(work / "tiny-bert")
    data = work / "train.csv"
    data.write_text("text,label\n" + "".join(f"good movie {i},positive\nbad movie {i},negative\n" for i in range(20)))
    outcomes, defects = Counter(), {}
    start = time.perf_counter()
    campaign("config", config_texts(model, data), lambda case, folder: validate_case(*case, folder),
             args.configs, outcomes, defects)
    campaign("data", data_files(), lambda case, folder: prepare_case(*case, model, folder),
             args.data, outcomes, defects)
    result = {"cases": sum(outcomes.values()), "seconds": round(time.perf_counter() - start),
              "outcomes": dict(sorted(outcomes.items())), "defects": defects}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(result, indent=2, ensure_ascii=False))
    shutil.rmtree(work, ignore_errors=True)
    return 1 if defects else 0


if __name__ == "__main__":
    sys.exit(main())
