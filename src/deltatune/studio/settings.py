"""What a studio instance serves and how it guards it: one dataclass, filled by ``deltatune studio``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 7860
    runs: Path = Path("runs")          # where run folders live (new runs go here); pages read only registry folders
    data_root: Path = Path(".")        # the Data page offers files under it, and nothing outside it
    token: str | None = None           # required for a non-loopback host; then every request must carry it
    max_upload_bytes: int = 50 * 2**20
    max_form_bytes: int = 64 * 2**10   # a POSTed form (a few fields): anything larger is refused
    max_streams: int = 32              # live (server-sent events) connections at once
    stream_seconds: float = 900.0      # one live connection at most this long (the browser reconnects)
    poll_seconds: float = 1.0          # how often a live connection looks at log.jsonl and status.json
    allowed_hosts: tuple[str, ...] = field(default_factory=tuple)  # Host headers accepted besides loopback names

    def __post_init__(self) -> None:
        self.runs = Path(self.runs).expanduser().resolve()
        self.data_root = Path(self.data_root).expanduser().resolve()

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK or self.host.startswith("127.")
