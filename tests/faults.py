"""The service with a fault injected into its inference workers, for tests:

    python -m tests.faults poison         # the model fails on any batch holding a "poison" digit
    python -m tests.faults compile-fails  # torch.compile raises, at warm-up
    python -m tests.faults setup-fails    # every inference worker dies in setup: a crash loop

The fault lives in a PredictAPI subclass: LitServe pickles it into each spawned worker, which
imports this module and runs the subclass's setup there. Production code only offers the seam
(``service.__main__.main(lit_api_class=...)``).
"""

from __future__ import annotations

import sys

import numpy as np

from service.__main__ import main
from service.inference import runtimes, torch_runtime
from service.inference.worker import PredictAPI

POISON_INK = 80_000  # a preprocessed digit with this much ink: a filled square, never a real digit


def poison_png() -> bytes:
    """An image that preprocesses to a filled 20x20 square (about 102,000 of ink)."""
    from model.preprocess import encode_png

    image = np.zeros((28, 28), np.uint8)
    image[4:24, 4:24] = 255
    return encode_png(image)


class PoisonedModelAPI(PredictAPI):
    def setup(self, device: str) -> None:
        real = runtimes.OnnxRuntime.probabilities

        def probabilities(runtime: runtimes.OnnxRuntime, pixels: np.ndarray) -> np.ndarray:
            if (pixels.reshape(len(pixels), -1).sum(axis=1, dtype=np.int64) > POISON_INK).any():
                raise ValueError("poisoned input")
            return real(runtime, pixels)

        runtimes.OnnxRuntime.probabilities = probabilities
        super().setup(device)


class CompileFailsAPI(PredictAPI):
    def setup(self, device: str) -> None:
        def compile_head(net):
            raise RuntimeError("torch.compile is broken here (injected by tests.faults)")

        torch_runtime.compile_head = compile_head
        super().setup(device)


class SetupFailsAPI(PredictAPI):
    def setup(self, device: str) -> None:
        raise RuntimeError("this worker cannot start (injected by tests.faults)")


FAULTS = {"poison": PoisonedModelAPI, "compile-fails": CompileFailsAPI, "setup-fails": SetupFailsAPI}

if __name__ == "__main__":
    sys.exit(main(argv=[], lit_api_class=FAULTS[sys.argv[1]]))
