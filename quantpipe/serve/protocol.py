"""The KServe v2 inference protocol's tensors: parse requests, build responses (HTTP/REST and gRPC).

HTTP requests are a JSON document, optionally followed by the binary tensor data extension: the
``Inference-Header-Content-Length`` header says where the JSON ends, and every input whose
``parameters.binary_data_size`` is set takes that many bytes of what follows, in input order. BYTES
tensors, in binary, are each element's 4-byte little-endian length followed by its bytes (Triton's
layout, which ``tritonclient`` writes and reads). Outputs go back binary when the request asks for
it (``parameters.binary_data`` on an output, or ``binary_data_output`` on the request), else as JSON
``data``.

Every malformed request raises :class:`InferError` with the HTTP status and the gRPC status name that
fit it; the fronts turn it into ``{"error": "..."}`` (HTTP) or a gRPC status.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["InferError", "Tensor", "OutputRequest", "InferRequest", "DTYPES", "parse_http_request",
           "bytes_to_elements", "elements_to_bytes", "tensor_from_raw", "encode_http_response"]

#: KServe v2 datatype -> numpy dtype (BYTES: object arrays of bytes).
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype(np.int8), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
_MAX_DIMS = 8


class InferError(Exception):
    """A request that cannot be answered: the message for the client, its HTTP status and gRPC code."""

    GRPC = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 413: "RESOURCE_EXHAUSTED",
            500: "INTERNAL", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}

    def __init__(self, message: str, status: int = 400, reason: str = "bad_request") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason  # the metrics label

    @property
    def grpc_code(self) -> str:
        return self.GRPC.get(self.status, "UNKNOWN")


@dataclass
class Tensor:
    """One input tensor as the client sent it."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray  # numeric: typed array of ``shape``; BYTES: object array of bytes of ``shape``


@dataclass
class OutputRequest:
    name: str
    binary: bool
    classification: int = 0  # Triton's classification extension: top-k "value:index:label" strings


@dataclass
class InferRequest:
    id: str
    inputs: list[Tensor]
    outputs: list[OutputRequest] | None  # None: every output, in the request's default encoding
    binary_default: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)


def _shape(value: Any, name: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > _MAX_DIMS or \
            not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise InferError(f"input '{name}': shape must be a list of at most {_MAX_DIMS} non-negative integers, got {value!r}")
    return tuple(value)


def bytes_to_elements(buf: memoryview | bytes, count: int, name: str) -> np.ndarray:
    """Triton's serialized BYTES tensor (u32 length + bytes per element) -> object array of bytes."""
    out = np.empty(count, dtype=object)
    pos, raw = 0, memoryview(buf)
    for i in range(count):
        if pos + 4 > len(raw):
            raise InferError(f"input '{name}': BYTES data ends after {i} of {count} elements (truncated)")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise InferError(f"input '{name}': BYTES element {i} claims {n} bytes, {len(raw) - pos} remain (truncated)")
        out[i] = bytes(raw[pos:pos + n])
        pos += n
    if pos != len(raw):
        raise InferError(f"input '{name}': {len(raw) - pos} bytes after the last BYTES element")
    return out


def elements_to_bytes(values: np.ndarray) -> bytes:
    """Object array of bytes/str -> Triton's serialized BYTES layout."""
    parts = []
    for v in values.reshape(-1):
        b = v if isinstance(v, bytes) else str(v).encode()
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def tensor_from_raw(name: str, datatype: str, shape: tuple[int, ...], raw: memoryview | bytes) -> Tensor:
    """A tensor from its raw bytes (binary extension / gRPC ``raw_input_contents``), checked against its shape."""
    if datatype not in DTYPES:
        raise InferError(f"input '{name}': unknown datatype {datatype!r} (KServe v2: {', '.join(DTYPES)})")
    count = int(np.prod(shape)) if shape else 1
    if datatype == "BYTES":
        return Tensor(name, datatype, shape, bytes_to_elements(raw, count, name).reshape(shape))
    dt = DTYPES[datatype]
    if len(raw) != count * dt.itemsize:
        raise InferError(f"input '{name}': {len(raw)} bytes of data for shape {list(shape)} {datatype} "
                         f"(needs {count * dt.itemsize}): truncated or mis-sized")
    return Tensor(name, datatype, shape, np.frombuffer(raw, dtype=dt).reshape(shape))


def _tensor_from_json(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> Tensor:
    if datatype not in DTYPES:
        raise InferError(f"input '{name}': unknown datatype {datatype!r} (KServe v2: {', '.join(DTYPES)})")
    count = int(np.prod(shape)) if shape else 1
    try:
        flat = np.asarray(data, dtype=object if datatype == "BYTES" else DTYPES[datatype]).reshape(-1)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InferError(f"input '{name}': data does not fit {datatype}: {exc}") from None
    if flat.size != count:
        raise InferError(f"input '{name}': {flat.size} values for shape {list(shape)} ({count} expected)")
    if datatype == "BYTES":
        flat = np.array([v.encode() if isinstance(v, str) else bytes(v) for v in flat], dtype=object)
    return Tensor(name, datatype, shape, flat.reshape(shape))


def parse_http_request(body: bytes, header_length: int | None) -> InferRequest:
    """Parse a KServe v2 HTTP infer body (JSON, optionally followed by binary tensor data)."""
    if header_length is None:
        header_length = len(body)
    if not 0 < header_length <= len(body):
        raise InferError(f"Inference-Header-Content-Length {header_length} does not fit a body of {len(body)} bytes")
    try:
        doc = json.loads(bytes(body[:header_length]))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InferError(f"the request's JSON header does not parse: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise InferError("the request needs a non-empty 'inputs' list")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise InferError("'parameters' must be an object")
    binary = memoryview(body)[header_length:]
    pos = 0
    inputs = []
    for item in doc["inputs"]:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not isinstance(item.get("datatype"), str):
            raise InferError("every input needs 'name', 'datatype' and 'shape'")
        name, datatype = item["name"], item["datatype"]
        shape = _shape(item.get("shape"), name)
        size = (item.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or pos + size > len(binary):
                raise InferError(f"input '{name}': binary_data_size {size!r} but only {len(binary) - pos} bytes "
                                 "of binary data remain (truncated body?)")
            inputs.append(tensor_from_raw(name, datatype, shape, binary[pos:pos + size]))
            pos += size
        elif "data" in item:
            inputs.append(_tensor_from_json(name, datatype, shape, item["data"]))
        else:
            raise InferError(f"input '{name}' has neither 'data' nor parameters.binary_data_size")
    if pos != len(binary):
        raise InferError(f"{len(binary) - pos} bytes of binary data after the last input: check binary_data_size")
    binary_default = bool(params.get("binary_data_output", False))
    outputs = None
    if doc.get("outputs") is not None:
        if not isinstance(doc["outputs"], list):
            raise InferError("'outputs' must be a list")
        outputs = []
        for o in doc["outputs"]:
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise InferError("every requested output needs a 'name'")
            p = o.get("parameters") or {}
            k = p.get("classification", 0)
            if not isinstance(k, int) or isinstance(k, bool) or k < 0:
                raise InferError(f"output '{o['name']}': classification must be a non-negative integer, got {k!r}")
            outputs.append(OutputRequest(o["name"], bool(p.get("binary_data", binary_default)), k))
    rid = doc.get("id", "")
    return InferRequest(str(rid) if rid is not None else "", inputs, outputs, binary_default, params)


def encode_http_response(model: str, version: str, request_id: str,
                         outputs: list[tuple[str, str, np.ndarray, bool]]) -> tuple[bytes, int | None]:
    """The response body and its JSON header length (None when nothing is binary).

    ``outputs``: (name, datatype, array, binary) per output, in order.
    """
    described, blobs = [], []
    for name, datatype, array, binary in outputs:
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            blob = elements_to_bytes(array) if datatype == "BYTES" else np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif datatype == "BYTES":
            entry["data"] = [v.decode() if isinstance(v, bytes) else str(v) for v in array.reshape(-1)]
        else:
            entry["data"] = array.reshape(-1).tolist()
        described.append(entry)
    doc: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": described}
    if request_id:
        doc["id"] = request_id
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)
