"""Feature extraction's head: fitted to convergence (the default, ``method.head=lbfgs``) against trained by
AdamW steps (``method.head=adamw``, the config's lr and epochs) and against scikit-learn's
LogisticRegressionCV on the very same cached features (the issue's reference: within 0.01).

    python benchmarks/feature_head.py [--config configs/minilm/classification-feature_extraction.yaml]
                                      [--out benchmarks/results/feature_head.json]

Each deltatune side is a full `deltatune train` run (output under $DELTATUNE_CACHE/bench-feature-head);
the scikit-learn side reads the train/eval features those runs cached, with 5 folds over the same grid.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs/minilm/classification-feature_extraction.yaml"))
    ap.add_argument("--out", default="benchmarks/results/feature_head.json")
    args = ap.parse_args()

    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import accuracy_score, f1_score

    from deltatune.configure import load_config
    from deltatune.fs import cache_dir
    from deltatune.methods.feature_extraction import L2_GRID
    from deltatune.train.run import build_job, train

    folder = cache_dir() / "bench-feature-head"
    result: dict = {"config": args.config}
    for head in ("lbfgs", "adamw"):
        out = folder / head
        start = time.perf_counter()
        run = train(load_config(args.config, [f"method.head={head}", f"output_dir={out}", "train.progress=false",
                                              "eval.forgetting=false"]))
        metrics = json.loads((run.path / "metrics.json").read_text())
        result[head] = {"accuracy": metrics["eval"]["accuracy"], "macro_f1": metrics["eval"]["macro_f1"],
                        "wall_s": round(time.perf_counter() - start, 1), "train_seconds": metrics["train_seconds"]}
        print(head, result[head], file=sys.stderr)

    job, _, _ = build_job(load_config(args.config, ["train.progress=false"]), None)  # the same cached features
    x = torch.stack([e["features"] for e in job.train_examples]).numpy()
    y = np.array([e["label"] for e in job.train_examples])
    ex = torch.stack([e["features"] for e in job.eval_examples]).numpy()
    ey = np.array([e["label"] for e in job.eval_examples])
    start = time.perf_counter()
    reference = LogisticRegressionCV(Cs=[1 / (l2 * len(y)) for l2 in L2_GRID], cv=5, scoring="neg_log_loss",
                                     max_iter=1000, l1_ratios=(0.0,), use_legacy_attributes=False).fit(x, y)
    predicted = reference.predict(ex)
    result["scikit_learn"] = {"accuracy": round(float(accuracy_score(ey, predicted)), 4),
                              "macro_f1": round(float(f1_score(ey, predicted, average="macro")), 4),
                              "l2": 1 / (float(reference.C_) * len(y)), "wall_s": round(time.perf_counter() - start, 1)}
    result["train_rows"], result["eval_rows"] = len(y), len(ey)
    result["lbfgs_minus_scikit_learn_macro_f1"] = round(result["lbfgs"]["macro_f1"]
                                                        - result["scikit_learn"]["macro_f1"], 4)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
