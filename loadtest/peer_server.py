"""What a user would write instead of this service: the strongest simple alternative.

FastAPI with ``UploadFile``, the service's preprocessing *as it was before the serving-path
work* (a frozen copy, :mod:`loadtest.peer_preprocess`, so that making the service's own
preprocessing faster counts for the service), the same ``model.onnx``, ONNX Runtime with one
thread per process, ``uvicorn --workers 2``. Also the floor: the same FastAPI multipart
endpoint answering a constant (``--null``), which no FastAPI server doing real work can beat.

    python -m loadtest.peer_server --port 8200 --model registry/versions/v0001/model.onnx [--null]
"""

from __future__ import annotations

import argparse
import os
from typing import Annotated

import uvicorn
from fastapi import FastAPI, File, HTTPException, UploadFile

from loadtest.peer_preprocess import ImageProblem, prepare_digit


def create_app() -> FastAPI:
    app = FastAPI(title="peer digit server")
    if os.environ.get("PEER_NULL") == "1":
        @app.post("/predict")
        async def constant(file: Annotated[UploadFile, File()]) -> dict:
            await file.read()
            return {"digit": 0}

        return app

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(os.environ["PEER_MODEL"], sess_options=options,
                                   providers=["CPUExecutionProvider"])

    @app.post("/predict")
    async def predict(file: Annotated[UploadFile, File()]) -> dict:
        try:
            pixels = prepare_digit(await file.read())
        except ImageProblem as exc:
            raise HTTPException(exc.status_code, exc.message) from None
        probabilities = session.run(None, {"pixels": pixels[None]})[0][0]
        digit = int(probabilities.argmax())
        return {"digit": digit, "confidence": float(probabilities[digit]),
                "probabilities": probabilities.tolist(), "runtime": "onnxruntime"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8200)
    parser.add_argument("--model", help="model.onnx (uint8 pixels in, probabilities out)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--null", action="store_true", help="answer a constant: the FastAPI floor")
    args = parser.parse_args()
    os.environ["PEER_NULL"] = "1" if args.null else "0"
    if not args.null:
        os.environ["PEER_MODEL"] = args.model
    uvicorn.run("loadtest.peer_server:create_app", factory=True, host=args.host, port=args.port,
                workers=args.workers, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
