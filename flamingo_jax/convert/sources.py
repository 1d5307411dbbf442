"""Lazy tensor sources: a checkpoint's tensor names and shapes at once, its data one tensor at a time.

    safetensors   one file, or shards listed by `*.safetensors.index.json`, read
                  with `safe_open(..., framework="numpy")` (bf16 arrives as
                  ml_dtypes.bfloat16, which numpy lacks natively);
    .bin / .pt    torch state dicts, read only through `torch.load(weights_only=True,
                  mmap=True)`: the unpickler accepts tensors and plain containers
                  and refuses anything that could run code, and mmap leaves the
                  data on disk until a tensor is read. Shards listed by
                  `pytorch_model.bin.index.json` work the same way.

A directory is searched for the usual file names (Hugging Face, open_clip, timm
exports); its `config.json` / `open_clip_config.json`, if any, is the source's
`config` (families read architecture fields from it).
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
from typing import Any

import numpy as np

from flamingo_jax.convert.errors import ConversionError

SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
# Looked for in a directory, in this order (HF, open_clip and timm hub layouts).
WEIGHT_FILES = (SAFETENSORS_INDEX, "model.safetensors", "open_clip_model.safetensors", TORCH_INDEX,
                "pytorch_model.bin", "open_clip_pytorch_model.bin")
CONFIG_FILES = ("config.json", "open_clip_config.json")
WEIGHT_EXTENSIONS = (".safetensors", ".bin", ".pt", ".pth")


class TensorSource(abc.ABC):
    """Named tensors: shapes without reading data, data one tensor at a time."""

    def __init__(self, path: str, config: dict[str, Any] | None):
        self.path = path
        self.config = config or {}

    @abc.abstractmethod
    def names(self) -> list[str]:
        """Every tensor name, sorted."""

    @abc.abstractmethod
    def shape(self, name: str) -> tuple[int, ...]:
        ...

    @abc.abstractmethod
    def read(self, name: str) -> np.ndarray:
        """The tensor's data as a numpy array (bf16 as ml_dtypes.bfloat16)."""

    def close(self) -> None:
        pass

    def __enter__(self) -> "TensorSource":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class SafetensorsSource(TensorSource):
    """One or several safetensors files (a sharded checkpoint's index maps names to files)."""

    def __init__(self, path: str, files_by_name: dict[str, str] | None = None, config=None):
        super().__init__(path, config)
        from safetensors import safe_open

        self._stack = contextlib.ExitStack()
        files = sorted(set(files_by_name.values())) if files_by_name else [path]
        self._handles, self._file_of = {}, {}
        try:
            for file in files:
                if not os.path.isfile(file):
                    raise ConversionError(f"{path}: shard {file} is missing; download every file the index lists.")
                try:
                    handle = self._stack.enter_context(safe_open(file, framework="numpy"))
                except Exception as error:  # safetensors raises its own SafetensorError
                    raise ConversionError(f"{file} is not a readable safetensors file ({error}).") from error
                self._handles[file] = handle
                for name in handle.keys():
                    self._file_of[name] = file
            if files_by_name:
                missing = sorted(name for name, file in files_by_name.items() if self._file_of.get(name) != file)
                if missing:
                    raise ConversionError(f"{path} lists {len(missing)} tensor(s) that its shards do not hold, e.g. "
                                          f"{missing[:3]}; the download is incomplete or the index is stale.")
        except BaseException:
            self._stack.close()
            raise

    def names(self) -> list[str]:
        return sorted(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._file_of[name]].get_slice(name).get_shape())

    def read(self, name: str) -> np.ndarray:
        return self._handles[self._file_of[name]].get_tensor(name)

    def close(self) -> None:
        self._stack.close()


class TorchSource(TensorSource):
    """torch state dicts (`.bin`, `.pt`, `.pth`), memory-mapped, loaded without running pickled code."""

    def __init__(self, path: str, files: list[str], config=None):
        super().__init__(path, config)
        self._tensors: dict[str, Any] = {}
        for file in files:
            if not os.path.isfile(file):
                raise ConversionError(f"{path}: shard {file} is missing; download every file the index lists.")
            for name, tensor in _load_state_dict(file).items():
                if name in self._tensors:
                    raise ConversionError(f"tensor {name!r} appears in more than one of {files}.")
                self._tensors[name] = tensor

    def names(self) -> list[str]:
        return sorted(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def read(self, name: str) -> np.ndarray:
        import torch

        tensor = self._tensors[name].detach()
        if tensor.dtype == torch.bfloat16:  # numpy has no bf16: reinterpret the bits as ml_dtypes'
            import ml_dtypes

            return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()

    def close(self) -> None:
        self._tensors.clear()


class ArraySource(TensorSource):
    """Tensors already in memory: a name -> numpy array (or torch tensor) mapping, e.g. a
    state dict a test or a caller holds."""

    def __init__(self, path: str, tensors: dict[str, Any], config=None):
        super().__init__(path, config)
        self._tensors = dict(tensors)

    def names(self) -> list[str]:
        return sorted(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def read(self, name: str) -> np.ndarray:
        tensor = self._tensors[name]
        if not hasattr(tensor, "detach"):
            return np.asarray(tensor)
        tensor = tensor.detach()
        if str(tensor.dtype) == "torch.bfloat16":  # as TorchSource: the bits as ml_dtypes' bfloat16
            import ml_dtypes
            import torch

            return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()


def _load_state_dict(file: str) -> dict[str, Any]:
    """A torch file's name -> tensor dict: weights only, memory-mapped; a training
    checkpoint's 'state_dict' / 'model_state_dict' (OpenFlamingo's) / 'model' entry and a DataParallel 'module.' prefix unwrapped."""
    try:
        import torch
    except ImportError as error:
        raise ConversionError(f"reading {file} needs torch (the CPU wheel is enough), or convert the file to "
                              "safetensors first.") from error
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # UnpicklingError, RuntimeError (legacy format), zip errors
        message = str(error).split("\n")[0]
        if "weights_only" in str(error) or "Unsupported global" in str(error):
            raise ConversionError(
                f"{file} holds Python objects other than tensors ({message}). It is refused because unpickling them "
                "could run arbitrary code. Re-save only the weights (torch.save(model.state_dict(), path)) or "
                "convert the file to safetensors.") from error
        raise ConversionError(
            f"{file} cannot be read as a torch state dict ({message}). Files written before torch 1.6 (the legacy, "
            "non-zip format) cannot be memory-mapped: re-save it with a current torch or convert it to "
            "safetensors.") from error
    if isinstance(loaded, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(loaded.get(key), dict) and not _is_tensor(loaded[key]):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict):
        raise ConversionError(f"{file} holds a {type(loaded).__name__}, not a state dict (a dict of tensors).")
    tensors = {name: value for name, value in loaded.items() if _is_tensor(value)}
    if not tensors:
        raise ConversionError(f"{file} holds no tensors at its top level (keys: {sorted(loaded)[:8]}).")
    if all(name.startswith("module.") for name in tensors):
        tensors = {name[len("module."):]: value for name, value in tensors.items()}
    return tensors


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ConversionError(f"{path} is not readable JSON ({error}).") from error


def _config_beside(directory: str) -> dict[str, Any]:
    config = {}
    for name in CONFIG_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            config[name] = _read_json(path)
    return config


def _weights_in(directory: str) -> str:
    for name in WEIGHT_FILES:
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    candidates = sorted(name for name in os.listdir(directory) if name.endswith(WEIGHT_EXTENSIONS))
    if len(candidates) == 1:
        return os.path.join(directory, candidates[0])
    if not candidates:
        raise ConversionError(f"--from={directory} holds no weights: expected one of {list(WEIGHT_FILES)} or a single "
                              f"{'/'.join(WEIGHT_EXTENSIONS)} file.")
    raise ConversionError(f"--from={directory} holds several weight files {candidates}; pass the one to convert "
                          "(or the *.index.json of a sharded checkpoint).")


def open_source(path: str) -> TensorSource:
    """The tensor source at `path`: a weights file, a shard index, or a directory holding either.

    `config` holds the JSON files found beside the weights, keyed by file name
    (`config.json`, `open_clip_config.json`)."""
    if not os.path.exists(path):
        raise ConversionError(f"--from={path}: no such file or directory.")
    file = _weights_in(path) if os.path.isdir(path) else path
    config = _config_beside(os.path.dirname(os.path.abspath(file)))
    directory = os.path.dirname(os.path.abspath(file))
    if file.endswith(".index.json"):
        index = _read_json(file)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{file} has no 'weight_map' (tensor name -> shard file).")
        files_by_name = {name: os.path.join(directory, shard) for name, shard in weight_map.items()}
        if all(shard.endswith(".safetensors") for shard in weight_map.values()):
            return SafetensorsSource(file, files_by_name, config)
        return TorchSource(file, sorted(set(files_by_name.values())), config)
    if file.endswith(".safetensors"):
        return SafetensorsSource(file, None, config)
    if file.endswith((".bin", ".pt", ".pth")):
        return TorchSource(file, [file], config)
    raise ConversionError(f"--from={path}: unknown weights file type; expected {'/'.join(WEIGHT_EXTENSIONS)} or a "
                          "*.index.json of shards.")
