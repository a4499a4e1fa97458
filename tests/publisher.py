"""Helper run as a subprocess by test_registry: publishes versions into a registry.

    python tests/publisher.py REGISTRY COUNT [SLOW_SECONDS]

With SLOW_SECONDS it writes an artifact slowly (touching REGISTRY/../writing first), so the
test can kill it at any instant of a publish.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.nets import build
from model.registry import Registry


def main() -> None:
    root, count = Path(sys.argv[1]), int(sys.argv[2])
    slow = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    registry = Registry(root)

    def artifacts(directory: Path, version: str) -> None:
        if slow:
            (root.parent / "writing").touch()
            with open(directory / "big.bin", "wb") as f:
                for _ in range(100):
                    f.write(b"\0" * 100_000)
                    f.flush()
                    time.sleep(slow / 100)

    for _ in range(count):
        manifest = registry.publish(build("simplenet"), "simplenet", write_artifacts=artifacts)
        print(manifest.version, flush=True)


if __name__ == "__main__":
    main()
