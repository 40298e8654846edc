"""Small helpers shared by tests."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from deltatune.configure import load_config

QUICK = ["train.progress=false", "train.batch_size=8", "train.eval_batch_size=16"]


def config(model: Path, task: str, method: str, train: Path, out: Path | None = None, *extra: str):
    overrides = [f"model={model}", f"task={task}", f"method.name={method}", f"data.train={train}", *QUICK, *extra]
    if out is not None:
        overrides.append(f"output_dir={out}")
    return load_config(None, overrides)


@contextmanager
def serving(engine, settings, start_seconds: float = 120) -> Iterator[str]:
    """``deltatune serve``'s server for ``engine`` on a free loopback port, in a thread: its base URL."""
    import threading
    import time

    from deltatune.serve.server import make_server

    settings.port = 0
    urls: list[str] = []
    server = make_server(engine, settings, on_ready=urls.append)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_seconds
    while not urls and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert urls, "the server did not start"
    assert urls[0].startswith("http://127.0.0.1:")
    try:
        yield urls[0]
    finally:
        server.should_exit = True
        thread.join(60)
        assert not thread.is_alive()


def randomize(run_dir: Path, seed: int) -> None:
    """Replace a run's trained delta by random values (IA3's scales around 1), so that deltas differ."""
    import torch
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(seed)
    for file in (run_dir / "delta").glob("*.safetensors"):
        state = load_file(file)
        save_file({k: torch.randn(v.shape, generator=g) * 0.3 + (1.0 if "ia3" in k else 0.0)
                   for k, v in state.items()}, file)
