"""Structured logs: one JSON object per line on stderr, with the request id where there is one."""

from __future__ import annotations

import logging
import sys
import time

import orjson

EXTRA_FIELDS = ("request_id", "method", "path", "status", "duration_ms", "job_id", "version", "pid")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for field in EXTRA_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                entry[field] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure_logging(level: str = "info") -> None:
    """JSON lines for our loggers ("digits.*"); LitServe and uvicorn keep their own format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("digits")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # The logging docs' own optimisations: our JSON lines carry neither the caller's file and
    # line nor thread names, so do not collect them (the access log runs per request). The
    # process id and name stay: LitServe's own format has ``%(processName)s[%(process)d]``, and
    # ``%d`` of None fails (every LitServe line was lost to a "--- Logging error ---"); its
    # ``%(filename)s:%(lineno)d`` reads "(unknown file):0".
    logging._srcfile = None
    logging.logThreads = False
