"""Loading untrusted pickles (hoi-forecast labels, label caches) without executing their code.

A pickle can call any importable function while it loads. Labels downloaded from a shared drive
are untrusted input, so they go through :class:`RestrictedUnpickler`, which only resolves:

* plain data types (containers and scalars are pickle opcodes, not globals) and a few harmless
  builtins such as ``set``/``frozenset``/``complex``;
* numpy array and dtype reconstruction;
* a short list of *inert* classes: the scipy spline objects hoi-forecast stores under
  ``fit_curve``. They are replaced by :class:`InertObject`, which keeps their state as data and
  runs none of their code (nothing here needs them; they can be refitted from ``traj``).

Anything else raises :class:`UnsafePickleError`, which the stages turn into a quarantine row.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle

import numpy as np
from numpy.lib import format as npy_format

_SAFE_GLOBALS = {
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "complex"), ("builtins", "slice"),
    ("builtins", "bytearray"), ("builtins", "object"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # protocol 0-2 store numpy buffers as latin-1 text
    ("copyreg", "_reconstructor"),  # protocol 0/1 objects; the class it builds is checked separately
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}
_SAFE_MODULE_PREFIXES = ("numpy.dtypes",)  # numpy 2 dtype classes (Float32DType, ...)

# Data-only classes found in real hoi-forecast label pickles, loaded as inert placeholders.
_INERT_CLASSES = {
    ("scipy.interpolate._cubic", "CubicHermiteSpline"),
    ("scipy.interpolate._cubic", "PchipInterpolator"),
    ("scipy.interpolate._cubic", "CubicSpline"),
    ("scipy.interpolate.interpolate", "PPoly"),
    ("scipy.interpolate._interpolate", "PPoly"),
}


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle references a global outside the allow-list."""


class InertObject:
    """Stands in for an allow-listed data class: holds its pickled state, executes nothing."""

    pickled_class = ""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<inert {self.pickled_class}>"


def _inert_class(module: str, name: str) -> type:
    return type(f"Inert{name}", (InertObject,), {"pickled_class": f"{module}.{name}"})


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        # Protocol 0-2 pickles name Python 2 modules (__builtin__.set); map them as pickle does.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _INERT_CLASSES:
            return _inert_class(module, name)
        if (module, name) in _SAFE_GLOBALS or module.startswith(_SAFE_MODULE_PREFIXES):
            return super().find_class(module, name)
        raise UnsafePickleError(f"pickle references {module}.{name}, which is not on the allow-list")


def loads(data: bytes):
    """``pickle.loads`` restricted to the allow-list."""
    return RestrictedUnpickler(io.BytesIO(data)).load()


def load_npy(data: bytes):
    """Load a ``.npy`` file, unpickling object arrays through the restricted unpickler.

    HandsOnVLM caches labels as ``np.save(path, dict)``: a 0-d object array whose payload is a
    pickle. Returns the array, or the contained object for 0-d object arrays.
    """
    f = io.BytesIO(data)
    version = npy_format.read_magic(f)
    read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(f)
    if dtype.hasobject:
        arr = RestrictedUnpickler(f).load()
    else:
        count = int(np.prod(shape)) if shape else 1
        arr = np.frombuffer(f.read(count * dtype.itemsize), dtype=dtype, count=count)
        arr = arr.reshape(shape, order="F" if fortran_order else "C")
    if isinstance(arr, np.ndarray) and arr.dtype.hasobject and arr.ndim == 0:
        return arr.item()
    return arr
