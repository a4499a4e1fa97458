"""``inference.GRPCInferenceService`` on grpc.aio, inside each API-server process.

It runs on the API server's event loop and calls the same ``predictor_of(app)`` as the
REST routes and /predict. Every API server binds the same port: gRPC sets SO_REUSEPORT by
default, so the kernel spreads connections over them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable

import grpc
import numpy as np
from fastapi import FastAPI
from google.protobuf.message import DecodeError

from service.inference import readiness
from service.inference.predictor import Predictor, predictor_of
from service.settings import Settings
from service.v2 import digits, tensors
from service.v2.errors import ProtocolError, bad_request
from service.v2.protos import grpc_predict_v2_pb2 as pb
from service.v2.protos import grpc_predict_v2_pb2_grpc as pb_grpc

log = logging.getLogger("digits.grpc")
STATUS_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
                413: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE,
                504: grpc.StatusCode.DEADLINE_EXCEEDED}
STOP_GRACE_SECONDS = 5.0
# Calls one API server runs at once (each holds up to DIGITS_MAX_BODY_BYTES); more are refused
# with RESOURCE_EXHAUSTED rather than queued without bound.
MAX_CONCURRENT_RPCS = 128


def answers_errors(method: Callable[..., Awaitable]) -> Callable[..., Awaitable]:
    """A ProtocolError becomes the matching gRPC status with its message."""

    @functools.wraps(method)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            return await method(self, request, context)
        except ProtocolError as exc:
            await context.abort(STATUS_CODES.get(exc.status_code, grpc.StatusCode.INVALID_ARGUMENT), exc.message)

    return wrapper


async def input_pixels(request: pb.ModelInferRequest, spec: digits.TensorSpec, batch: int,
                       max_pixels: int) -> np.ndarray:
    """uint8 [n,28,28] from raw_input_contents or typed contents."""
    tensor = request.inputs[0]
    raw = request.raw_input_contents
    if raw and tensor.HasField("contents"):
        raise bad_request("send input data either in raw_input_contents or in contents, not both")
    if len(raw) > 1:
        raise bad_request(f"raw_input_contents holds {len(raw)} tensors for 1 input")
    if not raw and not tensor.HasField("contents"):
        raise bad_request(f"input '{tensor.name}' has no data: fill raw_input_contents or contents")
    if spec is digits.IMAGE:
        images = (tensors.bytes_from_raw(raw[0], batch, tensor.name) if raw
                  else tensors.bytes_from_list(tensor.contents.bytes_contents, batch, tensor.name))
        return await digits.pixels_from_images(images, max_pixels)
    count = digits.pixel_count(batch)
    values = (tensors.uint8_from_raw(raw[0], count, tensor.name) if raw
              else tensors.uint8_from_values(np.asarray(tensor.contents.uint_contents), count, tensor.name))
    return digits.pixels_from_array(values, batch)


def parsing_itself(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
    """The same unary method, taking the raw bytes and parsing them itself: a message that is not
    valid protobuf gets INVALID_ARGUMENT (grpc.aio answers a failed parse as UNKNOWN)."""
    if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
        return handler
    parse, behavior = handler.request_deserializer, handler.unary_unary

    async def parse_then_call(raw: bytes, context: grpc.aio.ServicerContext):
        try:
            request = parse(raw)
        except DecodeError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid protobuf message: {exc}")
        return await behavior(request, context)

    return grpc.unary_unary_rpc_method_handler(parse_then_call, response_serializer=handler.response_serializer)


class RefusesMalformedMessages(grpc.aio.ServerInterceptor):
    """Every known method through :func:`parsing_itself` (made once per method)."""

    def __init__(self) -> None:
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = self._handlers.get(details.method)
        if handler is None:
            handler = parsing_itself(await continuation(details))
            if handler is not None:  # unknown methods are not kept: clients choose their names
                self._handlers[details.method] = handler
        return handler


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, app: FastAPI, settings: Settings) -> None:
        self.app, self.settings = app, settings

    @property
    def predictor(self) -> Predictor:
        return predictor_of(self.app)

    def served_version(self, name: str, version: str) -> str:
        return digits.served_version(self.predictor, self.settings.registry, name, version)

    async def ServerLive(self, request, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=readiness.report(self.app)["ready"])

    @answers_errors
    async def ModelReady(self, request, context) -> pb.ModelReadyResponse:
        self.served_version(request.name, request.version)
        return pb.ModelReadyResponse(ready=readiness.report(self.app)["ready"])

    async def ServerMetadata(self, request, context) -> pb.ServerMetadataResponse:
        meta = digits.server_metadata()
        return pb.ServerMetadataResponse(name=meta.name, version=meta.version, extensions=meta.extensions)

    @answers_errors
    async def ModelMetadata(self, request, context) -> pb.ModelMetadataResponse:
        served = self.served_version(request.name, request.version)
        meta = digits.metadata_for(self.app, served)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta.name, versions=meta.versions, platform=meta.platform,
            inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.inputs],
            outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.outputs],
        )

    @answers_errors
    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        self.served_version(request.model_name, request.model_version)
        spec, batch = digits.check_input(
            [digits.TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in request.inputs],
            digits.max_batch(self.settings),
        )
        outputs = digits.check_outputs([o.name for o in request.outputs] or None)
        pixels = await input_pixels(request, spec, batch, self.settings.max_pixels)
        prediction = await digits.predict(self.predictor, pixels, request.model_version)
        response = pb.ModelInferResponse(
            model_name=digits.MODEL_NAME, model_version=prediction.model_version, id=request.id,
        )
        response.parameters["runtime"].string_param = prediction.runtime
        for out, array in digits.output_arrays(prediction.probabilities, outputs):
            response.outputs.add(name=out.name, datatype=out.datatype, shape=array.shape)
            response.raw_output_contents.append(tensors.raw_of(array))
        return response


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start(app: FastAPI, settings: Settings) -> grpc.aio.Server:
    """Start serving on DIGITS_HOST:DIGITS_GRPC_PORT; messages over DIGITS_MAX_BODY_BYTES are refused."""
    server = grpc.aio.server(maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS, interceptors=[RefusesMalformedMessages()],
                             options=[
        ("grpc.max_receive_message_length", settings.max_body_bytes),
        ("grpc.so_reuseport", 1),
    ])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(app, settings), server)
    where = address(settings.host, settings.grpc_port)
    server.add_insecure_port(where)  # raises RuntimeError when the port cannot be bound
    await server.start()
    log.info("gRPC inference.GRPCInferenceService on %s", where)
    return server


async def stop(server: grpc.aio.Server) -> None:
    """Finish in-flight calls (up to a grace period), then close."""
    await server.stop(STOP_GRACE_SECONDS)
