"""The MLServer side of `make bench`'s V2 section: model.onnx in ONNX Runtime as an MLServer custom
runtime (MLServer has no ONNX runtime of its own). Runs inside MLServer's venv (.venv-mlserver),
never imported by the service or the tests. ``pixels`` UINT8 [n,28,28] in, ``probabilities`` FP32
[n,10] out; intra-op threads: every core (MLServer serves from one process here, see v2_bench)."""

import os

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxDigits(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = len(os.sched_getaffinity(0))
        self.session = ort.InferenceSession(self.settings.parameters.uri, options, providers=["CPUExecutionProvider"])
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        pixels = NumpyCodec.decode_input(payload.inputs[0]).astype(np.uint8, copy=False).reshape(-1, 28, 28)
        probabilities = self.session.run(["probabilities"], {"pixels": pixels})[0]
        output = NumpyCodec.encode_output("probabilities", probabilities)
        return InferenceResponse(model_name=self.name, outputs=[output])
