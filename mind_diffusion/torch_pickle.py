"""Read and write PyTorch's zip checkpoint format (``torch.save`` since 1.6) without torch.

A ``.pt`` file is a zip archive with one top folder holding ``data.pkl`` (a
pickle of the saved object, tensors referring to storages by key through
pickle's persistent ids), ``data/<key>`` (each storage's raw bytes), and small
records (``version``, ``byteorder``). A tensor is pickled as a call to
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``.

Reading runs pickle with a restricted ``find_class`` that admits only those
rebuild functions, the typed storage classes and ``collections.OrderedDict``,
so a checkpoint cannot execute code; tensors come back as numpy arrays.
Writing emits the same opcodes ``torch.save`` does for a flat state dict, so
files round-trip through both this module and ``torch.load``.
"""
import collections
import io
import pickle
import struct
import zipfile

import numpy as np

__all__ = ["CheckpointFormatError", "load_state_dict", "save_state_dict"]

# Storage class name in the pickle → numpy dtype of its elements. bfloat16 has
# no numpy dtype: its 16-bit patterns are widened to float32 exactly.
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_STORAGE_NAMES = {np.dtype(d): name for name, d in _STORAGE_DTYPES.items() if d != "bfloat16"}

_PICKLE_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # legacy torch.save header
_ALIGNMENT = 64  # torch aligns each storage's bytes in the zip so they can be memory-mapped


class CheckpointFormatError(ValueError):
    """The file is not a PyTorch zip checkpoint this module can read."""


class _StorageType:
    """Stands in for a ``torch.<X>Storage`` class inside the unpickled structure."""

    def __init__(self, name):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused):
    """``_rebuild_tensor_v2`` as numpy: view ``size``/``stride`` elements from ``storage_offset``, then copy."""
    size, stride = tuple(size), tuple(stride)
    if any(n == 0 for n in size):
        return np.zeros(size, dtype=storage.dtype)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if storage_offset < 0 or min(stride, default=0) < 0 or last >= storage.size:
        raise CheckpointFormatError(
            f"tensor of size {size}, stride {stride}, offset {storage_offset} overruns its storage of "
            f"{storage.size} elements"
        )
    view = np.lib.stride_tricks.as_strided(
        storage[storage_offset:], shape=size, strides=tuple(s * storage.itemsize for s in stride)
    )
    return np.array(view)


def _rebuild_parameter(data, *_unused):
    """``_rebuild_parameter``: a saved ``nn.Parameter`` is just its tensor here."""
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a tensor structure, refusing any other global and reading storages from the archive."""

    def __init__(self, file, archive, prefix, byteorder):
        super().__init__(file)
        self.archive = archive
        self.prefix = prefix
        self.byteorder = byteorder
        self.storages = {}

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise CheckpointFormatError(
            f"refusing to load global '{module}.{name}': only tensor state dicts are supported"
        )

    def persistent_load(self, saved_id):
        if not (isinstance(saved_id, tuple) and saved_id and saved_id[0] == "storage"):
            raise CheckpointFormatError(f"unknown persistent id {saved_id!r}")
        storage_type, key, _location, numel = saved_id[1:5]
        if not isinstance(storage_type, _StorageType):
            raise CheckpointFormatError(f"unsupported storage type {storage_type!r}")
        if key not in self.storages:
            self.storages[key] = self._read_storage(storage_type, str(key), numel)
        return self.storages[key]

    def _read_storage(self, storage_type, key, numel):
        try:
            raw = self.archive.read(f"{self.prefix}data/{key}")
        except KeyError:
            raise CheckpointFormatError(f"storage data/{key} is missing from the archive") from None
        if storage_type.dtype == "bfloat16":
            bits = np.frombuffer(raw, dtype=self.byteorder + "u2", count=numel)
            return (bits.astype(np.uint32) << 16).view(np.float32)
        dtype = np.dtype(storage_type.dtype).newbyteorder(self.byteorder)
        if len(raw) < numel * dtype.itemsize:
            raise CheckpointFormatError(f"storage data/{key} holds fewer than its {numel} elements")
        return np.frombuffer(raw, dtype=dtype, count=numel).astype(dtype.newbyteorder("="))


def load_state_dict(path):
    """Read a ``torch.save`` zip checkpoint into a plain object whose tensors are numpy arrays.

    :raises CheckpointFormatError: for anything but a zip checkpoint of tensors
        (legacy pre-1.6 files, other archives, files with arbitrary objects).
    """
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(len(_PICKLE_MAGIC))
        if head == _PICKLE_MAGIC:
            raise CheckpointFormatError(
                f"{path}: legacy (pre-1.6) torch.save format; re-save it with torch>=1.6 (zip format)"
            )
        raise CheckpointFormatError(f"{path}: not a PyTorch checkpoint (not a zip archive)")
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointFormatError(f"{path}: not a PyTorch checkpoint (no <name>/data.pkl in the archive)")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "<"
        if f"{prefix}byteorder" in archive.namelist():
            byteorder = {"little": "<", "big": ">"}[archive.read(f"{prefix}byteorder").decode().strip()]
        unpickler = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), archive, prefix, byteorder)
        try:
            return unpickler.load()
        except CheckpointFormatError as error:
            raise CheckpointFormatError(f"{path}: {error}") from None
        except (pickle.UnpicklingError, EOFError, TypeError, ValueError) as error:
            raise CheckpointFormatError(f"{path}: corrupt data.pkl ({error})") from None


class _PickleWriter:
    """Emits protocol-2 pickle opcodes for a flat ``OrderedDict[str, tensor]``, the way ``torch.save`` does."""

    def __init__(self):
        self.out = io.BytesIO()

    def op(self, code):
        self.out.write(code)

    def global_(self, module, name):
        self.op(pickle.GLOBAL + f"{module}\n{name}\n".encode())

    def string(self, text):
        data = text.encode("utf-8")
        self.op(pickle.BINUNICODE + struct.pack("<I", len(data)) + data)

    def integer(self, value):
        if 0 <= value < 256:
            self.op(pickle.BININT1 + struct.pack("<B", value))
        elif -(2**31) <= value < 2**31:
            self.op(pickle.BININT + struct.pack("<i", value))
        else:
            data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            self.op(pickle.LONG1 + struct.pack("<B", len(data)) + data)

    def int_tuple(self, values):
        self.op(pickle.MARK)
        for v in values:
            self.integer(v)
        self.op(pickle.TUPLE)

    def empty_ordered_dict(self):
        self.global_("collections", "OrderedDict")
        self.op(pickle.EMPTY_TUPLE + pickle.REDUCE)

    def tensor(self, key, array):
        """``_rebuild_tensor_v2(storage, 0, shape, contiguous stride, False, OrderedDict())``."""
        self.global_("torch._utils", "_rebuild_tensor_v2")
        self.op(pickle.MARK)
        self.op(pickle.MARK)
        self.string("storage")
        self.global_("torch", _STORAGE_NAMES[array.dtype])
        self.string(key)
        self.string("cpu")
        self.integer(array.size)
        self.op(pickle.TUPLE + pickle.BINPERSID)
        self.integer(0)
        self.int_tuple(array.shape)
        self.int_tuple(np.cumprod((1,) + array.shape[:0:-1])[::-1].tolist() if array.ndim else ())
        self.op(pickle.NEWFALSE)
        self.empty_ordered_dict()
        self.op(pickle.TUPLE + pickle.REDUCE)

    def state_dict(self, arrays):
        self.op(pickle.PROTO + b"\x02")
        self.empty_ordered_dict()
        self.op(pickle.MARK)
        for key, (name, array) in enumerate(arrays):
            self.string(name)
            self.tensor(str(key), array)
        self.op(pickle.SETITEMS + pickle.STOP)
        return self.out.getvalue()


def _write_aligned(archive, name, data):
    """Store ``data`` uncompressed, padding the local header's extra field so the bytes start 64-aligned."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    header_end = archive.fp.tell() + 30 + len(name.encode()) + 4  # fixed header, name, extra-field header
    padding = -header_end % _ALIGNMENT
    info.extra = b"FB" + struct.pack("<H", padding) + b"Z" * padding
    archive.writestr(info, data, compress_type=zipfile.ZIP_STORED)


def save_state_dict(state_dict, path, archive_name="archive"):
    """Write ``{name: numpy array}`` as a ``torch.save`` zip checkpoint (little-endian, format version 3).

    Arrays of float64/32/16, int64/32/16/8, uint8 and bool are supported;
    ``torch.load(path)`` returns the same names and values as torch tensors.
    """
    arrays = []
    for name, array in state_dict.items():
        array = np.asarray(array, order="C")  # not ascontiguousarray: it makes a 0-d array 1-d
        if array.dtype not in _STORAGE_NAMES:
            raise TypeError(f"{name}: dtype {array.dtype} has no PyTorch storage type here")
        arrays.append((name, array.astype(array.dtype.newbyteorder("<"))))
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        _write_aligned(archive, f"{archive_name}/data.pkl", _PickleWriter().state_dict(arrays))
        _write_aligned(archive, f"{archive_name}/byteorder", b"little")
        for key, (_, array) in enumerate(arrays):
            _write_aligned(archive, f"{archive_name}/data/{key}", array.tobytes())
        _write_aligned(archive, f"{archive_name}/version", b"3\n")
