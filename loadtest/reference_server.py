"""The server a user would write first: FastAPI, one process, eager torch, one image per
request. Same network, weights and preprocessing as the service; the benchmark's baseline.

    python -m loadtest.reference_server --port 8100
"""

from __future__ import annotations

import argparse
import base64
from typing import Annotated

import torch
import uvicorn
from fastapi import FastAPI, File, HTTPException, UploadFile
from pydantic import BaseModel

from model.data import normalize
from model.preprocess import ImageProblem, prepare_digit
from model.registry import Registry


class ImageJSON(BaseModel):
    image: str


def build_app(registry_path: str) -> FastAPI:
    model, manifest = Registry(registry_path).load_model()
    torch.set_num_threads(1)
    app = FastAPI(title="reference digit server")

    def classify(data: bytes) -> dict:
        try:
            pixels = prepare_digit(data)
        except ImageProblem as exc:
            raise HTTPException(exc.status_code, exc.message) from None
        with torch.no_grad():
            probabilities = torch.softmax(model(normalize(torch.from_numpy(pixels)[None])), dim=1)[0]
        digit = int(probabilities.argmax())
        return {"digit": digit, "confidence": float(probabilities[digit]),
                "probabilities": probabilities.tolist(), "model_version": manifest.version, "runtime": "torch-eager"}

    @app.post("/predict")
    async def predict(file: Annotated[UploadFile, File()]) -> dict:
        return classify(await file.read())

    @app.post("/predict-json")
    async def predict_json(body: ImageJSON) -> dict:
        return classify(base64.b64decode(body.image))

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--registry", default="registry")
    args = parser.parse_args()
    uvicorn.run(build_app(args.registry), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
