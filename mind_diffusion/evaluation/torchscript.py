"""Read the weights and attributes of a TorchScript archive (``torch.jit.save``) without torch.

A TorchScript ``.pt`` is the zip layout of ``torch.save`` (see
:mod:`mind_diffusion.torch_pickle`) plus ``code/`` (the modules' TorchScript
source) and ``constants.pkl``. Its ``data.pkl`` pickles the module tree: each
submodule is an object of a generated class ``__torch__.<module> <Class>``
whose state is a dict of its attributes (submodules, tensors, ints, lists,
flags). Reading runs the same restricted unpickler as torch checkpoints; the
generated classes become inert :class:`ScriptObject` records, so no code of the
archive is ever run — the architecture is the reader's to rebuild.
"""
import io
import pickle
import zipfile

import numpy as np

from ..torch_pickle import CheckpointFormatError, _RestrictedUnpickler

__all__ = ["ScriptObject", "read_script_module", "script_tensors"]


class ScriptObject:
    """One pickled TorchScript module: ``type_name`` (e.g. ``__torch__.inceptionv3.Conv2dLayer``) and
    ``attributes`` (its state dict: submodules, numpy arrays, Python values)."""

    type_name = "?"

    def __init__(self):
        self.attributes = {}

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise CheckpointFormatError(f"{self.type_name}: state is a {type(state).__name__}, not a dict")
        self.attributes = dict(state)

    def __repr__(self):
        return f"<{self.type_name} {sorted(self.attributes)}>"


def _restore_type_tag(value, _type_name):
    """``torch.jit._pickle.restore_type_tag``: the type annotation of a container is not needed here."""
    return value


# TorchScript pickles typed lists as calls to these builders; each takes a plain list.
_SCRIPT_GLOBALS = {
    ("torch.jit._pickle", "build_intlist"): list,
    ("torch.jit._pickle", "build_doublelist"): list,
    ("torch.jit._pickle", "build_boollist"): list,
    ("torch.jit._pickle", "build_tensorlist"): list,
    ("torch.jit._pickle", "build_genericlist"): list,
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
}


class _ScriptUnpickler(_RestrictedUnpickler):
    """The checkpoint unpickler, admitting in addition the archive's generated ``__torch__`` classes."""

    def __init__(self, *args):
        super().__init__(*args)
        self.classes = {}

    def find_class(self, module, name):
        if module == "__torch__" or module.startswith("__torch__."):
            full = f"{module}.{name}"
            if full not in self.classes:
                self.classes[full] = type(name, (ScriptObject,), {"type_name": full})
            return self.classes[full]
        if (module, name) in _SCRIPT_GLOBALS:
            return _SCRIPT_GLOBALS[(module, name)]
        return super().find_class(module, name)


def read_script_module(path):
    """The root :class:`ScriptObject` of a TorchScript archive, tensors as numpy arrays.

    :raises CheckpointFormatError: when ``path`` is no TorchScript zip archive of this kind.
    """
    if not zipfile.is_zipfile(path):
        raise CheckpointFormatError(f"{path}: not a TorchScript archive (not a zip file)")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1 or not any(n.startswith(pickles[0][:-len("data.pkl")] + "code/") for n in names):
            raise CheckpointFormatError(f"{path}: not a TorchScript archive (no <name>/data.pkl beside <name>/code/)")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "<"
        if f"{prefix}byteorder" in names:
            byteorder = {"little": "<", "big": ">"}[archive.read(f"{prefix}byteorder").decode().strip()]
        unpickler = _ScriptUnpickler(io.BytesIO(archive.read(pickles[0])), archive, prefix, byteorder)
        try:
            root = unpickler.load()
        except CheckpointFormatError as error:
            raise CheckpointFormatError(f"{path}: {error}") from None
        except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError) as error:
            raise CheckpointFormatError(f"{path}: corrupt data.pkl ({error})") from None
    if not isinstance(root, ScriptObject):
        raise CheckpointFormatError(f"{path}: data.pkl holds a {type(root).__name__}, not a TorchScript module")
    return root


def script_tensors(root, prefix=""):
    """Every tensor under ``root`` as ``{dotted.name: array}``, named by the attribute path
    (``net.layers.conv.weight``), the way ``state_dict()`` names them."""
    found = {}
    for name, value in root.attributes.items():
        if isinstance(value, ScriptObject):
            found.update(script_tensors(value, f"{prefix}{name}."))
        elif isinstance(value, np.ndarray):
            found[prefix + name] = value
    return found
