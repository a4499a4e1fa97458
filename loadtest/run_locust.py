"""`make loadtest`: locust, headless, against the service (started here if none is running).

Writes reports/locust_*.csv and reports/locust.html; exits non-zero when a request failed,
the wrong-digit rate is over 2%, or p99 is over LOADTEST_MAX_P99_MS.

    python -m loadtest.run_locust [--users 16] [--spawn-rate 8] [--time 30s] [--host URL]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import subprocess
import sys
from pathlib import Path

from devtools.processes import ROOT, is_up
from devtools.serverctl import private_registry, service
from service.settings import Settings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=os.environ.get("LOADTEST_HOST", "http://127.0.0.1:8000"))
    parser.add_argument("--users", type=int, default=int(os.environ.get("LOADTEST_USERS", "16")))
    parser.add_argument("--spawn-rate", type=float, default=8)
    parser.add_argument("--time", default=os.environ.get("LOADTEST_TIME", "30s"))
    parser.add_argument("--reports", type=Path, default=ROOT / "reports")
    args = parser.parse_args()
    args.reports.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    port = int(args.host.rsplit(":", 1)[1].split("/")[0])
    with contextlib.ExitStack() as stack:
        if is_up(args.host):
            print(f"using the server already running at {args.host}")
        else:
            env.setdefault("DIGITS_ADMIN_TOKEN", secrets.token_urlsafe(16))
            registry = private_registry(Settings().registry,
                                        args.reports / "loadtest-registry")
            print(f"starting the service on port {port} with a copy of the registry in {registry} "
                  "(stopped when the load test ends) ...", flush=True)
            stack.enter_context(service(port, args.reports, registry=str(registry),
                                        admin_token=env["DIGITS_ADMIN_TOKEN"], access_log="false"))
        command = [
            sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless",
            "--host", args.host, "-u", str(args.users), "-r", str(args.spawn_rate), "-t", args.time,
            "--csv", str(args.reports / "locust"), "--html", str(args.reports / "locust.html"),
            "--only-summary", "--stop-timeout", "10",
        ]
        print("running:", " ".join(command), flush=True)
        code = subprocess.run(command, cwd=ROOT, env=env, check=False).returncode
    print(f"reports: {args.reports}/locust.html, {args.reports}/locust_stats.csv")
    return code


if __name__ == "__main__":
    sys.exit(main())
