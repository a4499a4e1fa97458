"""One run of the load generator `hey` (Go, so its own CPU per request is small): POST a body
for some seconds at a concurrency, over that many keep-alive connections."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class HeyRun:
    rps: float
    p50_ms: float
    p99_ms: float
    ok: int  # 200 answers
    failed: int  # other statuses and errors


def post(url: str, body: Path, content_type: str, concurrency: int, seconds: float,
         headers: dict[str, str] | None = None) -> HeyRun:
    command = ["hey", "-z", f"{seconds}s", "-c", str(concurrency), "-m", "POST", "-t", "30", "-T", content_type,
               "-D", str(body)]
    for name, value in (headers or {}).items():
        command += ["-H", f"{name}: {value}"]
    out = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout

    def number(pattern: str) -> float:
        match = re.search(pattern, out)
        return float(match.group(1)) if match else float("nan")

    statuses = {int(code): int(n) for code, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)}
    _, _, error_section = out.partition("Error distribution:")
    errors = sum(int(n) for n in re.findall(r"^\s*\[(\d+)\]", error_section, flags=re.MULTILINE))
    ok = statuses.get(200, 0)
    failed = sum(n for code, n in statuses.items() if code != 200) + errors
    return HeyRun(number(r"Requests/sec:\s+([\d.]+)"), number(r"50%+ in ([\d.]+) secs") * 1e3,
                  number(r"99%+ in ([\d.]+) secs") * 1e3, ok, failed)
