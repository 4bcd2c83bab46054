"""A pickle module for `torch.load` that never runs code chosen by the file's author.

Released checkpoints are fairseq pickles from third-party hosts. `weights_only=True` refuses them
(they hold fairseq meters, numpy scalars, omegaconf or argparse objects), and `weights_only=False`
would import and call whatever the file names. Here only an allow-list of globals resolves to the
real object: torch's own tensor-rebuild functions, storages and dtypes, plain containers and numpy
scalar/array reconstruction. Any other global becomes an inert `Placeholder` subclass whose
instances only record their constructor arguments and pickled state.

Usage: `torch.load(path, pickle_module=sslam_core.safe_pickle, weights_only=False)`.
"""

from __future__ import annotations

import codecs
import collections
import datetime
import importlib
import io
import pickle
from typing import Any

import numpy as np
from torch import _weights_only_unpickler

UnpicklingError = pickle.UnpicklingError


class Placeholder:
    """Stand-in for a class or function the allow-list does not trust; it only keeps its data."""

    __module__ = __name__
    qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any):
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value: Any) -> None:
        self.__dict__.setdefault("list", []).append(value)

    def extend(self, values: Any) -> None:
        self.__dict__.setdefault("list", []).extend(values)

    def __repr__(self) -> str:
        return f"<untrusted {self.qualname}>"


class PlainNamespace(dict):
    """`argparse.Namespace` read back as a plain dict of its attributes."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple):  # (dict, slots) form
            state = state[0] or {}
        if isinstance(state, dict):
            self.update(state)


def _placeholder(module: str, name: str) -> type[Placeholder]:
    return type(name.split(".")[-1], (Placeholder,), {"qualname": f"{module}.{name}", "__module__": __name__})


def _safe_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """`copyreg._reconstructor` (protocol 0/1 objects) for trusted or placeholder classes only."""
    if isinstance(cls, type) and issubclass(cls, (Placeholder, PlainNamespace)):
        return cls.__new__(cls)
    raise UnpicklingError(f"refusing to reconstruct {cls!r}")


def _safe_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """`_codecs.encode`, which protocol-2 pickles use for bytes; text codecs only."""
    if codecs.lookup(encoding).name not in {"latin-1", "iso8859-1", "utf-8", "ascii"}:
        raise UnpicklingError(f"refusing codec {encoding!r}")
    return codecs.encode(text, encoding, errors)


def _numpy_globals() -> dict[str, Any]:
    core = importlib.import_module(
        "numpy._core.multiarray" if hasattr(np, "_core") else "numpy.core.multiarray"
    )
    allowed: dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for prefix in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[f"{prefix}.scalar"] = core.scalar
        allowed[f"{prefix}._reconstruct"] = core._reconstruct
    for name in dir(np.dtypes):
        if name.endswith("DType"):
            allowed[f"numpy.dtypes.{name}"] = getattr(np.dtypes, name)
    return allowed


def _allowed_globals() -> dict[str, Any]:
    allowed = dict(_weights_only_unpickler._get_allowed_globals())
    allowed.update(_numpy_globals())
    allowed.update(
        {
            "_codecs.encode": _safe_encode,
            "copyreg._reconstructor": _safe_reconstructor,
            "argparse.Namespace": PlainNamespace,
            "collections.OrderedDict": collections.OrderedDict,
            "collections.defaultdict": collections.defaultdict,
            "datetime.datetime": datetime.datetime,
            "datetime.date": datetime.date,
            "datetime.timedelta": datetime.timedelta,
        }
    )
    for t in (
        dict,
        list,
        tuple,
        set,
        frozenset,
        int,
        float,
        complex,
        bool,
        str,
        bytes,
        bytearray,
        slice,
        object,
    ):
        allowed[f"builtins.{t.__name__}"] = t
        allowed[f"__builtin__.{t.__name__}"] = t
    return allowed


ALLOWED: dict[str, Any] = _allowed_globals()


class Unpickler(pickle.Unpickler):
    """`pickle.Unpickler` whose globals come from `ALLOWED`, or else are inert placeholders."""

    def find_class(self, module: str, name: str) -> Any:
        key = f"{module}.{name}"
        if key in ALLOWED:
            return ALLOWED[key]
        return _placeholder(module, name)


def load(file: Any, **kwargs: Any) -> Any:
    """`pickle.load` through the restricted `Unpickler`."""
    return Unpickler(file, **kwargs).load()


def loads(data: bytes, **kwargs: Any) -> Any:
    """`pickle.loads` through the restricted `Unpickler`."""
    return Unpickler(io.BytesIO(data), **kwargs).load()


def to_plain(obj: Any) -> Any:
    """Replace omegaconf containers/nodes (read as placeholders) by plain dicts, lists and values."""
    if isinstance(obj, Placeholder):
        if obj.qualname.startswith("omegaconf."):
            state = obj.state if isinstance(obj.state, dict) else {}
            if "_content" in state:
                return to_plain(state["_content"])
            if "_val" in state:
                return to_plain(state["_val"])
        return obj
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_plain(v) for v in obj)
    return obj


__all__ = [
    "ALLOWED",
    "Placeholder",
    "PlainNamespace",
    "Unpickler",
    "UnpicklingError",
    "load",
    "loads",
    "to_plain",
]
