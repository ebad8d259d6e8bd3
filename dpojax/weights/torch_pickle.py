"""PyTorch checkpoints (``torch.save``'s zip format: ``.pt``, ``.pth``, ``.bin``) read into numpy, without torch.

Reward models are published this way (the LAION aesthetic head, HPSv2, ImageReward), and dpojax needs no torch at
run time. The file is a zip of one pickle plus one raw little-endian buffer per tensor storage. The unpickler
here accepts only what a state dict is made of (containers, numbers, strings, tensors and parameters), so a
checkpoint cannot run code when read, as ``torch.load(weights_only=True)`` guarantees. ``read_weights`` also takes
the same state dict converted to ``.safetensors``.
"""

from __future__ import annotations

import collections
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
# torch's legacy storage classes, which name a storage's element type in the pickle.
STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks, *state):
    return data


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix
        self.storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which is not part of a state dict")

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unexpected storage reference {pid!r}")
        _, storage_type, key, _location, numel = pid
        if key not in self.storages:
            data = self.archive.read(f"{self.prefix}/data/{key}")
            if len(data) < numel * storage_type.dtype.itemsize:
                raise pickle.UnpicklingError(f"storage {key} holds {len(data)} bytes, fewer than its {numel} elements")
            self.storages[key] = np.frombuffer(data, storage_type.dtype, count=numel)
        return self.storages[key]

    @staticmethod
    def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple, *rest) -> np.ndarray:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if all(n > 0 for n in size) and last >= len(storage):
            raise pickle.UnpicklingError(f"a tensor of shape {tuple(size)} reaches past its storage")
        view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                               strides=tuple(s * storage.itemsize for s in stride))
        return np.array(view)  # own the memory: views into one shared storage must not alias each other


def read_checkpoint(path: str | Path, what: str) -> Any:
    """The object ``torch.save`` wrote to ``path``, with tensors as numpy arrays in their stored dtypes.

    ``what`` names the file's role in errors; every failure is one line naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise ValueError("it has no data.pkl: not a torch.save checkpoint")
            prefix = pickles[0][: -len("/data.pkl")]
            if f"{prefix}/byteorder" in archive.namelist() and archive.read(f"{prefix}/byteorder") != b"little":
                raise ValueError("its tensors are big-endian")
            with archive.open(pickles[0]) as file:
                return _StateDictUnpickler(file, archive, prefix).load()
    except zipfile.BadZipFile as err:
        hint = " (torch's pre-1.6 format: re-save it with a newer torch)" if _is_legacy_pickle(path) else ""
        raise ValueError(f"{what} {path} is not a readable torch.save file: {err}{hint}") from None
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, struct.error, OSError) as err:
        raise ValueError(f"{what} {path} cannot be read (truncated or not a state dict?): {err}") from None


def read_state_dict(path: str | Path, what: str, *, key: str | None = None) -> dict[str, np.ndarray]:
    """The flat name -> array dict in ``path``: the saved dict itself, or its ``key`` entry where it has one
    (training checkpoints nest the weights as ``{"state_dict": ...}``). Non-tensor entries are dropped."""
    found = read_checkpoint(path, what)
    if key is not None and isinstance(found, dict) and isinstance(found.get(key), dict):
        found = found[key]
    if not isinstance(found, dict):
        raise ValueError(f"{what} {path} is not a state dict (found {type(found).__name__})")
    arrays = {name: value for name, value in found.items() if isinstance(value, np.ndarray)}
    if not arrays:
        raise ValueError(f"{what} {path} holds no tensors (keys: {', '.join(map(str, list(found)[:8]))})")
    return arrays


def read_weights(path: str | Path, what: str, *, key: str | None = None) -> dict[str, np.ndarray]:
    """A state dict from a ``torch.save`` file (``read_state_dict``) or a ``.safetensors`` file of the same keys;
    one-line errors naming ``what`` and the file."""
    path = Path(path)
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"{what} {path}: expected a {', '.join(WEIGHT_SUFFIXES)} file")
    if path.suffix != ".safetensors":
        return read_state_dict(path, what, key=key)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{what} {path} cannot be read: {' '.join(str(err).split())}") from None


def _is_legacy_pickle(path: Path) -> bool:
    with path.open("rb") as file:
        return file.read(2) == b"\x80\x02"
