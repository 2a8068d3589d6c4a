"""KServe v2 over gRPC: ``inference.GRPCInferenceService``, served by grpcio's asyncio server.

The message and service definitions are the KServe v2 / Triton ``grpc_service.proto`` as compiled and
shipped by ``tritonclient[grpc]`` (``tritonclient.grpc.service_pb2*``), so server and client speak
exactly the same protocol without a second copy of the generated code here. Implemented: ServerLive,
ServerReady, ServerMetadata, ModelReady, ModelMetadata, ModelConfig, ModelInfer, RepositoryIndex;
the rest answer UNIMPLEMENTED (grpcio's default). Inputs come in ``raw_input_contents`` (what
tritonclient sends) or typed ``contents``; outputs go back in ``raw_output_contents``. Errors are gRPC
status codes (INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE, DEADLINE_EXCEEDED, UNAUTHENTICATED, ...)
with the same messages as the HTTP front. With a token, every call but ServerLive/ServerReady needs
the metadata ``authorization: Bearer <token>``.
"""

from __future__ import annotations

import logging
import time

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from quantpipe import __version__
from quantpipe.serve.http_front import EXTENSIONS
from quantpipe.serve.model import VERSION
from quantpipe.serve.observe import AccessLog, token_matches
from quantpipe.serve.protocol import DTYPES, InferError, InferRequest, OutputRequest, Tensor, elements_to_bytes, \
    tensor_from_raw
from quantpipe.serve.service import InferenceService

__all__ = ["GrpcFront"]

log = logging.getLogger("quantpipe.serve.access")

_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
             "FP64": "fp64_contents", "BYTES": "bytes_contents"}
_OPEN = ("ServerLive", "ServerReady")


def _param(p: pb.InferParameter):
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


class _Servicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, front: "GrpcFront") -> None:
        self.front = front
        self.service = front.service

    async def _guard(self, name: str, context, fn, *args):
        """Auth, error mapping and the access log around one call."""
        t0 = time.perf_counter()
        reason, code = "", grpc.StatusCode.OK
        try:
            if self.front.token is not None and name not in _OPEN:
                header = dict(context.invocation_metadata()).get("authorization")
                if not token_matches(header, self.front.token):
                    raise InferError("missing or wrong bearer token: send metadata 'authorization: Bearer <token>'",
                                     401, "unauthorized")
            return await fn(*args)
        except InferError as exc:
            reason, code = exc.reason, getattr(grpc.StatusCode, exc.grpc_code, grpc.StatusCode.UNKNOWN)
            await context.abort(code, str(exc))
        finally:
            seconds = time.perf_counter() - t0
            if name == "ModelInfer":
                self.service.metrics.answered("grpc", seconds, reason)
            self.front.access.line(context.peer() or "-", "grpc", name, code.value[0], seconds, reason)

    def _model(self, name: str, version: str) -> None:
        if name != self.service.model.name:
            raise InferError(f"unknown model '{name}': this server serves '{self.service.model.name}'", 404,
                             "unknown_model")
        self.service.model.check_version(version)

    # -- health and metadata ----------------------------------------------------------------------
    async def ServerLive(self, request, context):
        return await self._guard("ServerLive", context, self._live)

    async def _live(self):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return await self._guard("ServerReady", context, self._ready)

    async def _ready(self):
        return pb.ServerReadyResponse(ready=self.service.ready())

    async def ServerMetadata(self, request, context):
        return await self._guard("ServerMetadata", context, self._server_metadata)

    async def _server_metadata(self):
        return pb.ServerMetadataResponse(name="quantpipe", version=__version__, extensions=EXTENSIONS)

    async def ModelReady(self, request, context):
        return await self._guard("ModelReady", context, self._model_ready, request)

    async def _model_ready(self, request):
        self._model(request.name, request.version)
        return pb.ModelReadyResponse(ready=self.service.ready())

    async def ModelMetadata(self, request, context):
        return await self._guard("ModelMetadata", context, self._model_metadata, request)

    async def _model_metadata(self, request):
        self._model(request.name, request.version)
        md = self.service.model.metadata()
        t = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=md["name"], versions=md["versions"], platform=md["platform"],
            inputs=[t(name=i["name"], datatype=i["datatype"], shape=i["shape"]) for i in md["inputs"]],
            outputs=[t(name=o["name"], datatype=o["datatype"], shape=o["shape"]) for o in md["outputs"]])

    async def ModelConfig(self, request, context):
        return await self._guard("ModelConfig", context, self._model_config, request)

    async def _model_config(self, request):
        from tritonclient.grpc import model_config_pb2 as mc

        self._model(request.name, request.version)
        md = self.service.model.metadata()
        types = {"FP32": mc.TYPE_FP32, "UINT8": mc.TYPE_UINT8, "BYTES": mc.TYPE_STRING}
        config = mc.ModelConfig(
            name=md["name"], platform="quantpipe", max_batch_size=self.service.cfg.microbatch,
            input=[mc.ModelInput(name=i["name"], data_type=types[i["datatype"]], dims=i["shape"][1:]) for i in md["inputs"]],
            output=[mc.ModelOutput(name=o["name"], data_type=mc.TYPE_FP32, dims=o["shape"][1:]) for o in md["outputs"]],
            dynamic_batching=mc.ModelDynamicBatching(max_queue_delay_microseconds=self.service.options.max_queue_delay_us))
        return pb.ModelConfigResponse(config=config)

    async def RepositoryIndex(self, request, context):
        return await self._guard("RepositoryIndex", context, self._index)

    async def _index(self):
        state = "READY" if self.service.ready() else "UNAVAILABLE"
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(
            name=self.service.model.name, version=VERSION, state=state)])

    # -- inference --------------------------------------------------------------------------------
    async def ModelInfer(self, request, context):
        return await self._guard("ModelInfer", context, self._infer, request)

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        self._model(request.model_name, request.model_version)
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(request.inputs):
            raise InferError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
        inputs = []
        for i, t in enumerate(request.inputs):
            shape = tuple(int(d) for d in t.shape)
            if any(d < 0 for d in shape):
                raise InferError(f"input '{t.name}': negative dimension in shape {list(shape)}")
            if raw:
                inputs.append(tensor_from_raw(t.name, t.datatype, shape, raw[i]))
            else:
                inputs.append(self._from_contents(t, shape))
        outputs = None
        if request.outputs:
            outputs = []
            for o in request.outputs:
                k = _param(o.parameters["classification"]) if "classification" in o.parameters else 0
                if not isinstance(k, int) or k < 0:
                    raise InferError(f"output '{o.name}': classification must be a non-negative integer")
                outputs.append(OutputRequest(o.name, True, k))
        results = await self.service.infer(InferRequest(request.id, inputs, outputs, True))
        response = pb.ModelInferResponse(model_name=self.service.model.name, model_version=VERSION, id=request.id)
        for name, datatype, array, _ in results:
            response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
            response.raw_output_contents.append(
                elements_to_bytes(array) if datatype == "BYTES" else np.ascontiguousarray(array).tobytes())
        return response

    @staticmethod
    def _from_contents(t, shape: tuple[int, ...]) -> Tensor:
        if t.datatype not in DTYPES:
            raise InferError(f"input '{t.name}': unknown datatype {t.datatype!r}")
        field = _CONTENTS.get(t.datatype)
        values = list(getattr(t.contents, field)) if field else []
        count = int(np.prod(shape)) if shape else 1
        if len(values) != count:
            raise InferError(f"input '{t.name}': {len(values)} values in contents for shape {list(shape)} ({count} expected)")
        dtype = object if t.datatype == "BYTES" else DTYPES[t.datatype]
        return Tensor(t.name, t.datatype, shape, np.array(values, dtype=dtype).reshape(shape))


class GrpcFront:
    """The gRPC server of one :class:`InferenceService` (grpc.aio, on the service's event loop)."""

    def __init__(self, service: InferenceService, host: str = "127.0.0.1", port: int = 8001, *,
                 token: str | None = None, max_message_bytes: int = 64 << 20,
                 access_log: AccessLog | None = None, reuse_port: bool = False) -> None:
        self.service, self.host, self.port = service, host, port
        self.token = token
        self.access = access_log or AccessLog(log)
        # SO_REUSEPORT only where asked (front workers share the port); else a taken port is an error
        self.server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_message_bytes),
                                               ("grpc.max_send_message_length", max_message_bytes),
                                               ("grpc.so_reuseport", int(reuse_port))])
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(_Servicer(self), self.server)

    async def start(self) -> int:
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.port = self.server.add_insecure_port(f"{host}:{self.port}")
        if not self.port:
            raise OSError(f"gRPC cannot listen on {self.host}:{self.port}")
        await self.server.start()
        return self.port

    async def stop(self) -> None:
        await self.server.stop(grace=1.0)
