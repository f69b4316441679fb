"""A safe channel for values coming back from code the grader does not trust.

The grader sends a learner's function its inputs and needs the outputs back from a process
that ran the learner's code. `pickle` cannot carry them: unpickling runs code chosen by
whoever wrote the bytes. This module encodes the values a check compares (numbers,
strings, bytes, lists, tuples, dicts, sets, NumPy arrays, torch tensors) as one JSON
document plus raw array blobs written with ``numpy.save(..., allow_pickle=False)``, and
decodes them without running anything: JSON is data, and ``numpy.load(allow_pickle=False)``
refuses object arrays. Anything else cannot be sent (`Unsendable`), and the decoder
enforces size and depth limits.

A message on the wire is ``len(header) (8 bytes) | header (JSON) | blob | blob | ...``.
"""

from __future__ import annotations

import base64
import io
import json
import math
import struct
from typing import Any, BinaryIO

import numpy as np

MAX_HEADER_BYTES = 16 * 2**20
MAX_MESSAGE_BYTES = 512 * 2**20
MAX_DEPTH = 32
# torch dtypes NumPy has no type for travel as their bit pattern, and are viewed back.
_BIT_VIEWS = {"bfloat16": "int16", "float8_e4m3fn": "uint8", "float8_e5m2": "uint8"}


class Unsendable(TypeError):
    """Raised when a value is not one of the kinds the channel carries."""


class WireError(ValueError):
    """Raised when bytes read from the channel are not a well-formed message."""


# --------------------------------------------------------------------------- encoding


def encode(value: Any) -> bytes:
    """Encode ``value`` as one message (header + blobs); raise `Unsendable` for other kinds."""
    blobs: list[bytes] = []
    tree = _to_tree(value, blobs, 0)
    header = json.dumps({"value": tree, "blobs": [len(b) for b in blobs]}).encode()
    return b"".join([struct.pack("<Q", len(header)), header, *blobs])


def _array_blob(array: np.ndarray, blobs: list[bytes]) -> int:
    if array.dtype.hasobject:
        raise Unsendable("an array of Python objects cannot be sent: use a numeric dtype")
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, order="C"), allow_pickle=False)
    blobs.append(buffer.getvalue())
    return len(blobs) - 1


def _to_tree(value: Any, blobs: list[bytes], depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise Unsendable(f"the value is nested more than {MAX_DEPTH} levels deep")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$": "float", "v": repr(value)}
    if value is Ellipsis:
        return {"$": "ellipsis"}
    if isinstance(value, (bytes, bytearray)):
        return {"$": "bytes", "v": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, (list, tuple, set, frozenset)):
        kind = {list: "list", tuple: "tuple", set: "set", frozenset: "set"}.get(type(value))
        kind = kind or ("tuple" if isinstance(value, tuple) else "list")  # namedtuple, subclass
        items = sorted(value, key=repr) if kind == "set" else value
        return {"$": kind, "v": [_to_tree(v, blobs, depth + 1) for v in items]}
    if isinstance(value, dict):
        pairs = [
            [_to_tree(k, blobs, depth + 1), _to_tree(v, blobs, depth + 1)] for k, v in value.items()
        ]
        return {"$": "dict", "v": pairs}
    if isinstance(value, np.generic):
        return {"$": "npscalar", "blob": _array_blob(np.asarray(value), blobs)}
    if isinstance(value, np.ndarray):
        return {"$": "ndarray", "blob": _array_blob(value, blobs)}
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        tensor = value.detach().cpu()
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype in _BIT_VIEWS:
            import torch

            tensor = tensor.view(getattr(torch, _BIT_VIEWS[dtype]))
        return {"$": "tensor", "dtype": dtype, "blob": _array_blob(tensor.numpy(), blobs)}
    raise Unsendable(
        f"a {type(value).__module__}.{type(value).__qualname__} cannot be sent back for grading: "
        "return numbers, strings, lists, tuples, dicts, NumPy arrays or torch tensors"
    )


# --------------------------------------------------------------------------- decoding


def read_message(stream: BinaryIO) -> Any:
    """Read one message from ``stream`` and decode it (raises `WireError`, `EOFError`)."""
    size = _read_exact(stream, 8)
    (header_len,) = struct.unpack("<Q", size)
    if header_len > MAX_HEADER_BYTES:
        raise WireError(f"a header of {header_len} bytes is over the limit")
    try:
        header = json.loads(_read_exact(stream, header_len))
        lengths = [int(n) for n in header["blobs"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise WireError(f"malformed header: {exc}") from None
    if any(n < 0 for n in lengths) or sum(lengths) > MAX_MESSAGE_BYTES:
        raise WireError("the arrays of the message are over the size limit")
    blobs = [_read_exact(stream, n) for n in lengths]
    return _from_tree(header["value"], blobs, 0)


def decode(message: bytes) -> Any:
    """Decode one message held in memory (see `read_message`)."""
    stream = io.BytesIO(message)
    value = read_message(stream)
    if stream.read(1):
        raise WireError("trailing bytes after the message")
    return value


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = stream.read(left)
        if not chunk:
            raise EOFError("the channel closed in the middle of a message")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _load_array(blobs: list[bytes], index: Any) -> np.ndarray:
    if not isinstance(index, int) or not 0 <= index < len(blobs):
        raise WireError(f"bad array reference {index!r}")
    try:
        return np.load(io.BytesIO(blobs[index]), allow_pickle=False)
    except ValueError as exc:
        raise WireError(f"bad array: {exc}") from None


def _from_tree(tree: Any, blobs: list[bytes], depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise WireError("the message is nested too deeply")
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    if not isinstance(tree, dict) or not isinstance(tree.get("$"), str):
        raise WireError(f"unexpected item in the message: {str(tree)[:60]}")
    kind, items = tree["$"], tree.get("v")
    if kind in ("list", "tuple", "set", "dict") and not isinstance(items, list):
        raise WireError(f"a {kind} without items")
    if kind == "list":
        return [_from_tree(v, blobs, depth + 1) for v in items]
    if kind == "tuple":
        return tuple(_from_tree(v, blobs, depth + 1) for v in items)
    try:  # an unhashable member or key, a pair of the wrong length
        if kind == "set":
            return {_from_tree(v, blobs, depth + 1) for v in items}
        if kind == "dict":
            pairs = [
                (_from_tree(k, blobs, depth + 1), _from_tree(v, blobs, depth + 1)) for k, v in items
            ]
            return dict(pairs)
    except (TypeError, ValueError) as exc:
        raise WireError(f"bad {kind}: {exc}") from None
    if kind == "float" and items in ("nan", "inf", "-inf"):
        return float(items)
    if kind == "ellipsis":
        return Ellipsis
    if kind == "bytes" and isinstance(items, str):
        return base64.b64decode(items, validate=True)
    if kind == "npscalar":
        return _load_array(blobs, tree.get("blob"))[()]
    if kind == "ndarray":
        return _load_array(blobs, tree.get("blob"))
    if kind == "tensor":
        import torch

        array = _load_array(blobs, tree.get("blob"))
        tensor = torch.from_numpy(array.copy())
        dtype = tree.get("dtype")
        if dtype in _BIT_VIEWS:
            tensor = tensor.view(getattr(torch, dtype))
        return tensor
    raise WireError(f"unknown item kind {kind!r}")
