"""Read and write the ``.safetensors`` format without torch or the safetensors package.

A file is an 8-byte little-endian header length N, N bytes of JSON, then one
byte buffer. The JSON maps each tensor name to ``{"dtype", "shape",
"data_offsets": [begin, end]}`` (offsets into the buffer, little-endian,
C order); an optional ``"__metadata__"`` entry holds string pairs. Nothing is
executed when reading, unlike a pickle. bfloat16 has no numpy dtype: its
16-bit patterns are widened to float32 exactly (as :mod:`torch_pickle` does).
"""
import json
import struct

import numpy as np

__all__ = ["SafetensorsFormatError", "load_safetensors", "save_safetensors"]

# The format's dtype codes → numpy dtypes (little-endian); "BF16" is widened to float32.
_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "bfloat16",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?",
}
_CODES = {np.dtype(d): code for code, d in _DTYPES.items() if d != "bfloat16"}
_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit on the JSON header


class SafetensorsFormatError(ValueError):
    """The file is not a .safetensors file this module can read."""


def _bfloat16_to_float32(raw):
    """bfloat16 bit patterns (uint16) → float32: the upper half of a float32's bits."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def load_safetensors(path):
    """``({name: np.ndarray}, metadata dict)`` of a .safetensors file, in the file's order.

    :raises SafetensorsFormatError: for a truncated file, a bad header, an unknown dtype, or
        offsets that do not fit the shape or the buffer.
    """
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise SafetensorsFormatError(f"{path}: too short to be a .safetensors file")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if header_len > min(_MAX_HEADER, len(blob) - 8):
        raise SafetensorsFormatError(f"{path}: header length {header_len} does not fit the file "
                                     "(not a .safetensors file, or truncated)")
    try:
        header = json.loads(blob[8:8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SafetensorsFormatError(f"{path}: unreadable JSON header: {error}") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError(f"{path}: the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    buffer = memoryview(blob)[8 + header_len:]
    tensors = {}
    for name, info in header.items():
        try:
            code, shape, (begin, end) = info["dtype"], [int(n) for n in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SafetensorsFormatError(f"{path}: tensor {name!r} has a malformed entry {info!r}") from None
        if code not in _DTYPES:
            raise SafetensorsFormatError(f"{path}: tensor {name!r} has unsupported dtype {code!r}; "
                                         f"known: {', '.join(_DTYPES)}")
        wire = np.dtype("<u2") if _DTYPES[code] == "bfloat16" else np.dtype(_DTYPES[code])
        count = int(np.prod(shape, dtype=np.int64))
        if not 0 <= begin <= end <= len(buffer) or end - begin != count * wire.itemsize:
            raise SafetensorsFormatError(f"{path}: tensor {name!r} ({code}, shape {shape}) has offsets "
                                         f"[{begin}, {end}] that do not fit its size or the file")
        array = np.frombuffer(buffer[begin:end], dtype=wire, count=count).reshape(shape)
        if _DTYPES[code] == "bfloat16":
            array = _bfloat16_to_float32(array)
        tensors[name] = np.array(array, dtype=array.dtype.newbyteorder("="))  # a native, writable copy
    return tensors, dict(metadata)


def save_safetensors(tensors, path, metadata=None):
    """Write ``{name: array}`` as a .safetensors file (tensors in sorted order, as the reference writer)."""
    header, chunks, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name in sorted(tensors):
        array = np.asarray(tensors[name], order="C")  # (ascontiguousarray would make a scalar 1-D)
        array = array.astype(array.dtype.newbyteorder("<"))  # the format is little-endian
        if array.dtype not in _CODES:
            raise ValueError(f"tensor {name!r}: dtype {array.dtype} has no safetensors code; "
                             f"use one of {', '.join(str(d) for d in _CODES)}")
        data, code = array.tobytes(), _CODES[array.dtype]
        header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the reference pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for chunk in chunks:
            f.write(chunk)
