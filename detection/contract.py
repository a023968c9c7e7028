"""The detection I/O contract shared by every server: ours (``/v2``) and Triton Inference Server.

It follows TensorRT's EfficientNMS convention:

- input ``image``: BYTES, one encoded image (JPEG, PNG, WebP or BMP) per batch row, dims ``[1]``;
- outputs ``num_detections`` INT32 ``[1]``, ``detection_boxes`` FP32 ``[max_det, 4]`` (``x1, y1, x2, y2``
  in the original image's pixels), ``detection_scores`` FP32 ``[max_det]``, ``detection_classes`` INT32
  ``[max_det]`` (an index into the class names); rows past ``num_detections`` are zero padding.

The class names and the defaults of ``conf``, ``iou`` and ``max_det`` are the model config's
``parameters``; request parameters of the same names override them (``max_det`` up to the config's,
which fixes the output shapes).

:func:`model_config` builds a config in Triton's JSON shape (the one ``GET /v2/models/NAME/config``
answers and ``tritonclient``'s ``get_model_config`` returns); :func:`to_pbtxt` writes such a dict as a
``config.pbtxt`` (protobuf text format). Nothing heavy is imported here: this module runs inside
tritonserver's Python-backend stub too.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

INPUT = "image"
NUM = "num_detections"
BOXES = "detection_boxes"
SCORES = "detection_scores"
CLASSES = "detection_classes"
OUTPUTS = (NUM, BOXES, SCORES, CLASSES)
#: v2 datatype and numpy dtype of each output
OUTPUT_TYPES = {NUM: ("INT32", np.int32), BOXES: ("FP32", np.float32), SCORES: ("FP32", np.float32),
                CLASSES: ("INT32", np.int32)}  # fmt: skip
MODEL_VERSION = "1"

#: v2 datatypes <-> Triton config enums
CONFIG_TYPES = {"BYTES": "TYPE_STRING", "FP32": "TYPE_FP32", "INT32": "TYPE_INT32", "FP16": "TYPE_FP16",
                "INT64": "TYPE_INT64", "UINT8": "TYPE_UINT8", "BOOL": "TYPE_BOOL"}  # fmt: skip


class ContractError(ValueError):
    """A request that breaks the contract (a bad parameter, a wrong tensor): the message is for the client."""


def output_dims(max_det: int) -> dict[str, list[int]]:
    """Each output's dims without the batch axis."""
    return {NUM: [1], BOXES: [max_det, 4], SCORES: [max_det], CLASSES: [max_det]}


# ------------------------------------------------------------------------------------------ parameters
@dataclass(frozen=True)
class Params:
    conf: float
    iou: float
    max_det: int


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for an error message that echoes what a client sent (one
    line: repr escapes newlines and lone surrogates; an int too long to print is named by its digit count)."""
    try:
        text = repr(value)
    except ValueError:  # an int past sys.get_int_max_str_digits()
        return f"an integer of more than {sys.get_int_max_str_digits()} digits"
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


def _number(name: str, value: Any) -> float:
    if isinstance(value, Mapping):  # gRPC-style {"double_param": 0.3}
        value = next(iter(value.values()), None)
    if isinstance(value, bool) or value is None:
        raise ContractError(f"parameter {name!r} must be a number, got {shown(value)}")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int beyond a float's range (10**400)
        raise ContractError(f"parameter {name!r} must be a number within a float's range, got {shown(value)}") from None
    if not math.isfinite(number):
        raise ContractError(f"parameter {name!r} must be finite, got {shown(value)}")
    return number


def request_params(given: Mapping[str, Any] | None, defaults: Params) -> Params:
    """``defaults`` overridden by a request's ``conf``, ``iou`` and ``max_det`` (other keys are ignored)."""
    given = given or {}
    conf, iou, max_det = defaults.conf, defaults.iou, defaults.max_det
    if "conf" in given:
        conf = _number("conf", given["conf"])
        if not 0 <= conf <= 1:
            raise ContractError(f"parameter 'conf' must be in [0, 1], got {shown(given['conf'])}")
    if "iou" in given:
        iou = _number("iou", given["iou"])
        if not 0 <= iou <= 1:
            raise ContractError(f"parameter 'iou' must be in [0, 1], got {shown(given['iou'])}")
    if "max_det" in given:
        value = _number("max_det", given["max_det"])
        if value != int(value) or not 1 <= value <= defaults.max_det:
            raise ContractError(
                f"parameter 'max_det' must be a whole number from 1 to {defaults.max_det} (the model's output "
                f"size), got {shown(given['max_det'])}"
            )
        max_det = int(value)
    return Params(conf, iou, max_det)


# ------------------------------------------------------------------------------------------ tensors
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM")


def _looks_like_image(data: bytes) -> bool:
    return data.startswith(_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def image_bytes(value: Any) -> bytes:
    """One row of the ``image`` tensor as the encoded image's bytes.

    Binary requests carry the image itself. JSON requests cannot (JSON strings are text), so a row may
    also be the image in base64: a row that does not start like a JPEG, PNG, WebP or BMP image but is
    base64 of one is decoded. Both servers do this, so one JSON request works against either.
    """
    if isinstance(value, str):
        try:
            data = value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError as e:  # a lone surrogate ("\ud800" in JSON) has no UTF-8 form
            raise ContractError(
                f"input {INPUT!r}: a row is text that is not valid UTF-8 ({e.reason} at character {e.start}); "
                "send the image in base64 or as binary data"
            ) from None
    elif isinstance(value, (bytes, bytearray, memoryview, np.bytes_)):
        data = bytes(value)
    else:
        raise ContractError(f"input {INPUT!r}: each row must be an encoded image, got {type(value).__name__}")
    if data and not _looks_like_image(data):
        try:
            decoded = base64.b64decode(b"".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            return data
        if _looks_like_image(decoded):
            return decoded
    return data


def split_bytes(raw: bytes, count: int) -> list[bytes]:
    """A BYTES tensor's raw data (HTTP's binary extension, gRPC's ``raw_input_contents``): each element a
    4-byte little-endian length, then its bytes; ``count`` elements, no more, no less."""
    out, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise ContractError(f"input {INPUT!r}: binary BYTES data ends inside an element's length prefix")
        (n,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + n > len(raw):
            raise ContractError(f"input {INPUT!r}: a binary BYTES element says {n} bytes but fewer remain")
        out.append(raw[offset : offset + n])
        offset += n
    if len(out) != count:
        raise ContractError(f"input {INPUT!r}: shape says {count} elements, the binary data holds {len(out)}")
    return out


def pack(detections: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], max_det: int) -> dict[str, np.ndarray]:
    """Per-image ``(boxes (K, 4), scores (K,), class ids (K,))`` -> the four output tensors, batch first,
    padded with zeros to ``max_det`` rows (``K <= max_det``)."""
    n = len(detections)
    num = np.zeros((n, 1), np.int32)
    boxes = np.zeros((n, max_det, 4), np.float32)
    scores = np.zeros((n, max_det), np.float32)
    classes = np.zeros((n, max_det), np.int32)
    for i, (b, s, c) in enumerate(detections):
        k = len(s)
        if k > max_det:
            raise ValueError(f"pack: {k} detections for an output of {max_det} rows")
        num[i, 0] = k
        boxes[i, :k] = b
        scores[i, :k] = s
        classes[i, :k] = c
    return {NUM: num, BOXES: boxes, SCORES: scores, CLASSES: classes}


def unpack(outputs: Mapping[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The four output tensors -> per-image ``(boxes, scores, class ids)`` without the padding."""
    out = []
    for i, k in enumerate(np.asarray(outputs[NUM]).reshape(-1)):
        k = int(k)
        out.append((outputs[BOXES][i, :k], outputs[SCORES][i, :k], outputs[CLASSES][i, :k]))
    return out


# ------------------------------------------------------------------------------------------ model config
class Enum(str):
    """A protobuf enum value: written unquoted in text format."""


def _tensor(name: str, datatype: str, dims: Sequence[int]) -> dict:
    return {"name": name, "data_type": Enum(CONFIG_TYPES[datatype]), "dims": [int(d) for d in dims]}


def contract_io(max_det: int) -> tuple[list[dict], list[dict]]:
    """The contract's inputs and outputs as config entries."""
    inputs = [_tensor(INPUT, "BYTES", [1])]
    outputs = [_tensor(name, OUTPUT_TYPES[name][0], dims) for name, dims in output_dims(max_det).items()]
    return inputs, outputs


def string_parameters(values: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """``{key: {"string_value": text}}`` (Triton's config ``parameters``); lists become JSON."""
    out = {}
    for key, value in values.items():
        if value is None:
            continue
        text = json.dumps(value) if isinstance(value, (list, dict, tuple)) else str(value)
        out[key] = {"string_value": text}
    return out


def model_config(
    name: str,
    *,
    max_batch: int,
    class_names: Sequence[str],
    input_size: int,
    defaults: Params,
    backend: str = "python",
    instances: int = 1,
    instance_kind: str = "KIND_CPU",
    max_queue_delay_us: int = 5000,
    parameters: Mapping[str, Any] | None = None,
) -> dict:
    """The config of a model answering the contract, in Triton's JSON shape (``model_config.proto``)."""
    inputs, outputs = contract_io(defaults.max_det)
    params = {
        "class_names": list(class_names),
        "conf": defaults.conf,
        "iou": defaults.iou,
        "max_det": defaults.max_det,
        "input_size": input_size,
        **(parameters or {}),
    }
    config: dict[str, Any] = {"name": name, "backend": backend, "max_batch_size": int(max_batch)}
    config["input"] = inputs
    config["output"] = outputs
    if max_batch > 0:
        config["dynamic_batching"] = {"max_queue_delay_microseconds": int(max_queue_delay_us)}
    config["instance_group"] = [{"count": int(instances), "kind": Enum(instance_kind)}]
    config["parameters"] = string_parameters(params)
    return config


def json_config(config: Mapping[str, Any]) -> dict:
    """A config dict as plain JSON values (the enums as strings), as Triton's HTTP API answers it."""
    return json.loads(json.dumps(config))


#: the map fields of Triton's model config that a config dict may hold
MAP_FIELDS = frozenset({"parameters", "input_map", "output_map"})


def _scalar(value: Any) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{text}"'


def _fields(obj: Mapping[str, Any], indent: int) -> list[str]:
    pad = "  " * indent
    lines = []
    for key, value in obj.items():
        if key in MAP_FIELDS and isinstance(value, Mapping):  # a protobuf map: one {key, value} entry per key
            for k, v in value.items():
                lines.append(f"{pad}{key} {{")
                lines.extend(_fields({"key": k, "value": v}, indent + 1))
                lines.append(f"{pad}}}")
        elif isinstance(value, Mapping):
            lines.append(f"{pad}{key} {{")
            lines.extend(_fields(value, indent + 1))
            lines.append(f"{pad}}}")
        elif isinstance(value, (list, tuple)):
            if value and all(isinstance(v, Mapping) for v in value):
                lines.append(f"{pad}{key} [")
                for j, v in enumerate(value):
                    lines.append(f"{pad}  {{")
                    lines.extend(_fields(v, indent + 2))
                    lines.append(f"{pad}  }}{',' if j < len(value) - 1 else ''}")
                lines.append(f"{pad}]")
            else:
                lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return lines


def to_pbtxt(config: Mapping[str, Any]) -> str:
    """A config dict (Triton's JSON field names, :class:`Enum` for enum values) in protobuf text format."""
    return "\n".join(_fields(config, 0)) + "\n"
