"""A pickle module for `torch.load` that never runs code chosen by the file's author.

Released checkpoints are fairseq pickles from third-party hosts. `weights_only=True` refuses them
(they hold fairseq meters, numpy scalars, omegaconf or argparse objects), and `weights_only=False`
would import and call whatever the file names. Here every global the pickle names is looked up in
two lists kept apart, each entry with the reason it is there:

- `RESOLVED`: names read as the real object, because calling them only builds data: torch's tensor
  and storage rebuild functions, dtypes and devices; plain containers and values; numpy's scalar and
  array reconstruction; `_codecs.encode` (text codecs only) and `copyreg._reconstructor` (for the
  placeholders below only).
- `PLACEHOLDER_MODULES`: names read as inert `Placeholder` classes, which only
  record their constructor arguments and pickled state, because real SSLAM / EAT / fairseq
  checkpoints contain them (fairseq meters and config dataclasses, omegaconf nodes, data2vec, EAT
  and SSLAM configs and enums, `typing` annotations in omegaconf metadata). `argparse.Namespace`
  (old fairseq `args`) is resolved, to a plain dict.

Any other global (`posix.system`, `builtins.eval`, `subprocess.Popen`, ...) raises `RefusedGlobal`
naming it, before anything is called.

Usage: `torch.load(path, pickle_module=sslam_core.models.safe_pickle, weights_only=False)`.
"""

from __future__ import annotations

import _compat_pickle
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


class RefusedGlobal(UnpicklingError):
    """The pickle names a global that no model file needs; `.name` is its `module.qualname`."""

    def __init__(self, name: str):
        super().__init__(f"refusing global {name}")
        self.name = name


class Placeholder:
    """Stand-in for a class or function of a trusted-as-data module; it only keeps its data."""

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
        return f"<placeholder {self.qualname}>"


class PlainNamespace(dict):
    """`argparse.Namespace` read back as a plain dict of its attributes."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple):  # (dict, slots) form
            state = state[0] or {}
        if isinstance(state, dict):
            self.update(state)


def _safe_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """`copyreg._reconstructor` (protocol 0/1 objects) for placeholder classes only."""
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
    found: dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for prefix in ("numpy.core.multiarray", "numpy._core.multiarray"):
        found[f"{prefix}.scalar"] = core.scalar
        found[f"{prefix}._reconstruct"] = core._reconstruct
    for name in dir(np.dtypes):
        if name.endswith("DType"):
            found[f"numpy.dtypes.{name}"] = getattr(np.dtypes, name)
    return found


def _builtins() -> dict[str, Any]:
    types = (
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
    )
    return {f"builtins.{t.__name__}": t for t in types}


def _resolved() -> dict[str, tuple[Any, str]]:
    groups: list[tuple[str, dict[str, Any]]] = [
        (
            "torch's own weights_only allow-list: tensor, parameter and storage rebuild functions, "
            "dtypes, layouts, devices, torch.Size; they build tensors from the file's storages",
            _weights_only_unpickler._get_allowed_globals(),
        ),
        ("plain values and containers (omegaconf metadata names builtin types too)", _builtins()),
        (
            "plain containers and values in fairseq state (OrderedDict state dicts, meters, timings)",
            {
                "collections.OrderedDict": collections.OrderedDict,
                "collections.defaultdict": collections.defaultdict,
                "collections.Counter": collections.Counter,
                "datetime.datetime": datetime.datetime,
                "datetime.date": datetime.date,
                "datetime.timedelta": datetime.timedelta,
            },
        ),
        ("numpy scalars and arrays (fairseq metrics, best scores), rebuilt from bytes", _numpy_globals()),
        (
            "bytes in protocol 2 pickles; only text codecs, so no codec can run code",
            {"_codecs.encode": _safe_encode},
        ),
        (
            "protocol 0/1 objects; only placeholder classes may be reconstructed",
            {"copyreg._reconstructor": _safe_reconstructor},
        ),
        (
            "old fairseq checkpoints keep their options in `args`; read as a plain dict",
            {"argparse.Namespace": PlainNamespace},
        ),
    ]
    return {name: (obj, reason) for reason, found in groups for name, obj in found.items()}


RESOLVED: dict[str, tuple[Any, str]] = _resolved()
"""Globals read as the real object: name -> (object, reason)."""

_USER_DIR = "configs and enums (e.g. PredictionMode) of an official user dir, in `cfg` saved unresolved"
PLACEHOLDER_MODULES: dict[str, str] = {
    "fairseq": "fairseq trainer state: meters in extra_state['metrics'] (fairseq.logging.meters), "
    "config dataclasses and ChoiceEnum members (fairseq.dataclass) in `cfg`",
    "omegaconf": "`cfg` saved as DictConfig / ListConfig, with their nodes and metadata",
    "examples.data2vec": "data2vec 2.0 config dataclasses and the Modality enum in pre-training `cfg`",
    "EAT": _USER_DIR,
    "SSLAM_Stage2": _USER_DIR,
    "SSLAM_Ft_SPASS": _USER_DIR,
    "SSLAM_Inference": _USER_DIR,
    "typing": "omegaconf metadata records annotations such as typing.Any as ref_type / key_type",
}
"""Modules (with their submodules) whose globals become inert placeholders: module -> reason.
`argparse.Namespace` (old fairseq `args`) is read as a plain dict, see `RESOLVED`."""


def _placeholder(key: str) -> type[Placeholder]:
    return type(key.rsplit(".", 1)[-1], (Placeholder,), {"qualname": key, "__module__": __name__})


def _is_placeholder(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in PLACEHOLDER_MODULES)


class Unpickler(pickle.Unpickler):
    """`pickle.Unpickler` whose globals come from `RESOLVED`, become placeholders, or are refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 names, as in protocols 0-2
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        key = f"{module}.{name}"
        if key in RESOLVED:
            return RESOLVED[key][0]
        if _is_placeholder(module):
            return _placeholder(key)
        raise RefusedGlobal(key)


def load(file: Any, **kwargs: Any) -> Any:
    """`pickle.load` through the restricted `Unpickler`."""
    return Unpickler(file, **kwargs).load()


def loads(data: bytes, **kwargs: Any) -> Any:
    """`pickle.loads` through the restricted `Unpickler`."""
    return Unpickler(io.BytesIO(data), **kwargs).load()


def refused_global(error: BaseException) -> str | None:
    """The name of the refused global behind `error` (torch may wrap it), else None."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, RefusedGlobal):
            return error.name
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


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
    "PLACEHOLDER_MODULES",
    "RESOLVED",
    "Placeholder",
    "PlainNamespace",
    "RefusedGlobal",
    "Unpickler",
    "UnpicklingError",
    "load",
    "loads",
    "refused_global",
    "to_plain",
]
