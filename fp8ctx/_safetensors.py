"""safetensors files, one tensor at a time: a streaming writer and a reader that keeps little of the file resident.

The store file (``_storefile``) and checkpoint reading (``_checkpoint``) are built on these two.
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from collections.abc import Mapping
from typing import Any

import torch

from ._errors import FP8Error

__all__ = ["DTYPES", "NAMES", "TensorReader", "write_safetensors"]

# safetensors' dtype names (the file header spells these) and the torch dtypes they hold
DTYPES: dict[str, torch.dtype] = {
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
# a handle is reopened after this many bytes: safetensors maps the file, and the pages read stay resident
# until the map is closed, so reading through one handle would make the whole file resident
_WINDOW = 16 * 2**20


def write_safetensors(path: str, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """The safetensors format (8-byte little-endian header size, JSON header, raw little-endian data),
    streamed: ``safetensors.torch.save_file`` first builds the whole file's bytes in memory."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in NAMES:
            raise FP8Error(f"tensor {name!r} has dtype {tensor.dtype}, which a store file cannot hold")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    # written beside the target and renamed over it once complete: an interrupt or a full disk part way
    # leaves the file that was there (or none), never a truncated store under the name
    partial = f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"
    try:
        with open(partial, "xb") as handle:
            handle.write(struct.pack("<Q", len(encoded)))
            handle.write(encoded)
            for tensor in tensors.values():
                host = tensor.detach().to("cpu").contiguous()
                if host.numel():
                    handle.write(host.reshape(-1).view(torch.uint8).numpy().tobytes())
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


class TensorReader:
    """Reads tensors of one safetensors file one at a time, onto ``device``.

    The file's map is reopened after every ``_WINDOW`` bytes, so the host memory a read costs is about one
    tensor, not the file (see ``_WINDOW``).
    """

    def __init__(self, path: str, device: torch.device = torch.device("cpu")) -> None:
        self.path = path
        self._device = str(device)
        self._handle: Any = None
        self._since_open = 0
        handle = self._open()
        self.metadata: dict[str, str] = handle.metadata() or {}
        self.keys = list(handle.keys())
        self.headers = {key: _header(handle, key, path) for key in self.keys}

    def _open(self) -> Any:
        from safetensors import safe_open

        if self._handle is None:
            try:
                # entered as a context: its exit is what unmaps the file (dropping the object does not)
                self._handle = safe_open(self.path, framework="pt", device=self._device).__enter__()
            except (FileNotFoundError, IsADirectoryError, PermissionError):
                raise
            except Exception as error:  # safetensors' own error type for a file of another format
                raise FP8Error(
                    f"{self.path!r} is not a safetensors file ({error}); write a store with FP8Store.save"
                ) from None
            self._since_open = 0
        return self._handle

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key``, read now.

        Raises:
            FP8Error: the file's data cannot be read (names the file and the tensor).
        """
        if self._since_open > _WINDOW:
            self.close()
        handle = self._open()
        try:
            tensor = handle.get_tensor(key)
        except (torch.OutOfMemoryError, KeyboardInterrupt):
            raise
        except Exception as error:
            raise FP8Error(f"{self.path!r}: tensor {key!r} cannot be read ({error})") from None
        self._since_open += tensor.numel() * tensor.element_size()
        return tensor

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (along dim 0) of the tensor ``key``; only those are read."""
        if self._since_open > _WINDOW:
            self.close()
        handle = self._open()
        try:
            tensor = handle.get_slice(key)[start:stop]
        except (torch.OutOfMemoryError, KeyboardInterrupt):
            raise
        except Exception as error:
            raise FP8Error(f"{self.path!r}: rows {start}:{stop} of tensor {key!r} cannot be read ({error})") from None
        self._since_open += tensor.numel() * tensor.element_size()
        return tensor

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.__exit__(None, None, None)

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _header(handle: Any, key: str, path: str) -> tuple[torch.dtype | None, tuple[int, ...]]:
    """A tensor's dtype (None for a dtype no store holds) and shape, from the header alone."""
    try:
        piece = handle.get_slice(key)
        return DTYPES.get(piece.get_dtype()), tuple(piece.get_shape())
    except Exception as error:
        raise FP8Error(f"{path!r}: the header of tensor {key!r} cannot be read ({error})") from None
