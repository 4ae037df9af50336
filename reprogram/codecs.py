"""Tensor codecs of the Open Inference Protocol (KServe V2): datatypes, JSON ``data`` and the
raw little-endian bytes of the binary tensor extension.

``data`` travels flattened in row-major order (nested lists are accepted too); ``BYTES``
elements travel as a 4-byte little-endian length followed by the bytes. Every shape passes
:func:`reprogram.strict.check_shape` before any array is made (a zero dimension gives an empty
tensor). Every malformed tensor raises :class:`~reprogram.errors.ProtocolError` with an
"expected X, got Y" message.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from reprogram.errors import ProtocolError
from reprogram.strict import check_shape

DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(np.object_),
}
"""V2 datatype name -> numpy dtype (little-endian on the wire; ``BYTES`` is an object array)."""

_END = object()


def datatype_of(array: np.ndarray) -> str:
    """The V2 datatype name of a numpy array (object/str/bytes arrays are ``BYTES``)."""
    kind = array.dtype.kind
    if kind in "OSU":
        return "BYTES"
    for name, dtype in DATATYPES.items():
        if name != "BYTES" and array.dtype.newbyteorder("<") == dtype:
            return name
    raise ProtocolError(
        f"expected an array of one of {sorted(DATATYPES)} types, got dtype {array.dtype}"
    )


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    """The numpy dtype of a V2 datatype name."""
    try:
        return DATATYPES[datatype]
    except KeyError:
        raise ProtocolError(
            f"expected a datatype in {sorted(DATATYPES)}, got {datatype!r}"
        ) from None


def as_numpy(x: Any) -> np.ndarray:
    """Accept a numpy array, a torch tensor or a nested list; return a numpy array."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch.Tensor, without importing torch
        return np.asarray(x.detach().cpu().numpy())
    return np.asarray(x)


def element_count(shape: Sequence[int], name: str = "tensor") -> int:
    """Number of elements of a tensor of ``shape`` (validated by
    :func:`~reprogram.strict.check_shape`)."""
    return math.prod(check_shape(shape, repr(name)))


def _flatten(data: Any, out: list[Any]) -> None:
    """Append the leaves of nested lists to ``out`` in row-major order (no recursion: a
    hostile nesting depth cannot exhaust the stack)."""
    stack = [iter([data])]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            stack.append(iter(item))
        else:
            out.append(item)


def _bytes_from_json(data: Any, name: str) -> np.ndarray:
    flat: list[Any] = []
    _flatten(data, flat)
    items = np.empty(len(flat), dtype=object)
    for i, item in enumerate(flat):
        if not isinstance(item, str):
            raise ProtocolError(
                f"expected strings in BYTES tensor {name!r}, got {type(item).__name__}"
            )
        items[i] = item.encode("utf-8")
    return items


def from_json_data(data: Any, shape: Sequence[int], datatype: str, name: str) -> np.ndarray:
    """Decode JSON ``data`` (flat or nested, row-major) into an array of ``shape``.

    Checks that the element count matches ``shape``, that the values have the datatype's kind
    (integers for integer types, numbers for floats, booleans for ``BOOL``, strings for
    ``BYTES``) and that integers fit the datatype's range.
    """
    dtype = numpy_dtype(datatype)
    want = element_count(shape, name)
    if not isinstance(data, list):
        raise ProtocolError(f"expected a list in 'data' of {name!r}, got {type(data).__name__}")
    if datatype == "BYTES":
        flat = _bytes_from_json(data, name)
    else:
        try:
            flat = np.asarray(data).reshape(-1)
        except (ValueError, TypeError):
            raise ProtocolError(
                f"expected 'data' of {name!r} to be a flat or regularly nested list of numbers,"
                " got a ragged or mixed list"
            ) from None
        if dtype.kind in "iu" and flat.dtype.kind in "fO":
            flat = _python_ints(data, datatype, dtype, name)  # e.g. UINT64 beyond int64
        flat = _cast_json_numbers(flat, datatype, dtype, name)
    if flat.size != want:
        raise ProtocolError(
            f"expected {want} elements in 'data' of {name!r} (shape {list(shape)}),"
            f" got {flat.size}"
        )
    return flat.reshape(tuple(shape))


def _python_ints(data: list[Any], datatype: str, dtype: np.dtype[Any], name: str) -> np.ndarray:
    items: list[Any] = []
    _flatten(data, items)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise ProtocolError(f"expected integers in {datatype} tensor {name!r}, got other values")
    try:
        return np.array(items, dtype=dtype)
    except OverflowError:
        info = np.iinfo(dtype)
        raise ProtocolError(
            f"expected {datatype} values in [{info.min}, {info.max}] in {name!r},"
            f" got values in [{min(items)}, {max(items)}]"
        ) from None


def _cast_json_numbers(
    flat: np.ndarray, datatype: str, dtype: np.dtype[Any], name: str
) -> np.ndarray:
    kind = flat.dtype.kind
    if flat.size == 0:
        return flat.astype(dtype)
    if datatype == "BOOL":
        if kind != "b":
            raise ProtocolError(f"expected booleans in BOOL tensor {name!r}, got {flat.dtype}")
        return flat
    if dtype.kind in "iu":
        if kind not in "iu":
            raise ProtocolError(
                f"expected integers in {datatype} tensor {name!r}, got {_kind_name(kind)}"
            )
        info = np.iinfo(dtype)
        lo, hi = int(flat.min()), int(flat.max())
        if lo < info.min or hi > info.max:
            raise ProtocolError(
                f"expected {datatype} values in [{info.min}, {info.max}] in {name!r},"
                f" got values in [{lo}, {hi}]"
            )
        return flat.astype(dtype)
    if kind not in "iuf":
        raise ProtocolError(
            f"expected numbers in {datatype} tensor {name!r}, got {_kind_name(kind)}"
        )
    return flat.astype(dtype)


def _kind_name(kind: str) -> str:
    return {"f": "floats", "b": "booleans", "U": "strings", "O": "mixed values"}.get(
        kind, f"values of kind {kind!r}"
    )


def to_json_data(array: np.ndarray) -> list[Any]:
    """Flatten an array into JSON ``data`` (row-major; ``BYTES`` as UTF-8 strings)."""
    if array.dtype.kind in "OSU":
        out = []
        for item in array.reshape(-1):
            if isinstance(item, bytes):
                try:
                    out.append(item.decode("utf-8"))
                except UnicodeDecodeError:
                    raise ProtocolError(
                        "expected UTF-8 text in a BYTES tensor sent as JSON, got raw bytes;"
                        " send it as binary data"
                    ) from None
            else:
                out.append(str(item))
        return out
    result: list[Any] = array.reshape(-1).tolist()
    return result


# ----------------------------------------------------------------------------------------------
# raw (binary extension) data


def serialize_bytes_tensor(array: np.ndarray) -> bytes:
    """``BYTES`` elements as 4-byte little-endian length + bytes, row-major."""
    parts = []
    for item in array.reshape(-1):
        raw = item if isinstance(item, bytes) else str(item).encode("utf-8")
        parts.append(struct.pack("<I", len(raw)))
        parts.append(raw)
    return b"".join(parts)


def deserialize_bytes_tensor(raw: bytes | memoryview, name: str = "tensor") -> np.ndarray:
    """Inverse of :func:`serialize_bytes_tensor`: a flat object array of ``bytes``."""
    raw = bytes(raw)
    items: list[bytes] = []
    pos = 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise ProtocolError(
                f"expected a 4-byte length prefix at byte {pos} of BYTES tensor {name!r},"
                f" got {len(raw) - pos} bytes"
            )
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise ProtocolError(
                f"expected {n} bytes for an element of BYTES tensor {name!r},"
                f" got {len(raw) - pos}"
            )
        items.append(raw[pos : pos + n])
        pos += n
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def to_raw(array: np.ndarray, datatype: str) -> bytes:
    """The binary-extension bytes of an array (little-endian)."""
    if datatype == "BYTES":
        return serialize_bytes_tensor(array)
    return np.ascontiguousarray(array, dtype=numpy_dtype(datatype)).tobytes()


def from_raw(raw: bytes | memoryview, shape: Sequence[int], datatype: str, name: str) -> np.ndarray:
    """Decode binary-extension bytes of one tensor into a (writable) array of ``shape``."""
    want = element_count(shape, name)
    if datatype == "BYTES":
        flat = deserialize_bytes_tensor(raw, name)
        if flat.size != want:
            raise ProtocolError(
                f"expected {want} elements in BYTES tensor {name!r} (shape {list(shape)}),"
                f" got {flat.size}"
            )
        return flat.reshape(tuple(shape))
    dtype = numpy_dtype(datatype)
    nbytes = want * dtype.itemsize
    if len(raw) != nbytes:
        raise ProtocolError(
            f"expected binary_data_size {nbytes} for {datatype} tensor {name!r} of shape"
            f" {list(shape)}, got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(tuple(shape)).copy()


# ----------------------------------------------------------------------------------------------
# classification extension


def encode_classification(
    scores: np.ndarray, k: int, class_names: Sequence[str] | None = None
) -> np.ndarray:
    """Top-``k`` of each row of ``scores [N, K]`` as Triton's ``"score:index:label"`` strings.

    Returns an object array of ``bytes`` of shape ``[N, min(k, K)]``, best first (ties by
    lower index). Scores are printed as the shortest decimal that round-trips in float32.
    """
    if scores.ndim != 2:
        raise ProtocolError(f"expected scores of rank 2 for classification, got {scores.shape}")
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    out = np.empty((scores.shape[0], k), dtype=object)
    for i, row in enumerate(order):
        for j, idx in enumerate(row):
            text = f"{np.float32(scores[i, idx])!s}:{int(idx)}"
            if class_names is not None:
                text += f":{class_names[int(idx)]}"
            out[i, j] = text.encode("utf-8")
    return out


def decode_classification(array: np.ndarray) -> list[list[tuple[float, int, str | None]]]:
    """Parse a classification output (``[N, k]`` strings) into ``(score, index, label)``."""
    rows = array.reshape(array.shape[0], -1) if array.ndim else array.reshape(1, -1)
    result = []
    for row in rows:
        parsed = []
        for item in row:
            text = item.decode("utf-8") if isinstance(item, bytes) else str(item)
            parts = text.split(":", 2)
            try:
                score, index = float(parts[0]), int(parts[1])
            except (ValueError, IndexError):
                raise ProtocolError(
                    f"expected 'score:index[:label]' in a classification output, got {text!r}"
                ) from None
            parsed.append((score, index, parts[2] if len(parts) > 2 else None))
        result.append(parsed)
    return result
