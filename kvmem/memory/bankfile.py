"""A memory bank's file: one safetensors file, its JSON metadata in the safetensors header.

``write_bank_file(path, tensors, meta)`` / ``read_bank_file(path)``. Nothing is unpickled:
tensors are read by safetensors, the metadata by ``json``. The header holds one entry,
``"kvmem_bank"``: the bank's metadata (``meta``, a JSON object) plus ``"format"``,
``"format_version"`` and, per tensor, its shape, dtype and the sha256 of its bytes, so a file whose
tensor bytes were changed after it was written (a flipped bit, a partial copy) is refused even
where safetensors' own framing is intact.

Saving is atomic: the file is written to a temporary file in the same directory, flushed to disk
and renamed over ``path`` (``os.replace``), so an interrupted save leaves any earlier file intact
and a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from typing import Dict, Tuple

import torch

__all__ = ["FORMAT", "FORMAT_VERSION", "BankFileError", "write_bank_file", "read_bank_file"]

FORMAT = "kvmem-memory-bank"
FORMAT_VERSION = 1
_KEY = "kvmem_bank"


class BankFileError(ValueError):
    """A memory-bank file that cannot be read: truncated, corrupted or not a bank."""


def _digest(t: torch.Tensor) -> str:
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(flat.cpu().numpy().tobytes()).hexdigest()


def _target(path, fn: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{fn}: argument 'path' must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{fn}: argument 'path' must be a file path, got the directory {path!r}")
    return path


def write_bank_file(path, tensors: Dict[str, torch.Tensor], meta: dict) -> None:
    """Write ``tensors`` and ``meta`` (JSON-serialisable) to ``path``, atomically (module docstring).

    Raises
    ------
    IsADirectoryError: ``path`` is a directory; FileNotFoundError: its directory does not exist;
    PermissionError: its directory is not writable. An existing file at ``path`` is unchanged then.
    """
    from safetensors.torch import save_file

    fn = "kvmem.MemoryBank.save"
    path = _target(path, fn)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{fn}: argument 'path' must be in an existing directory, {parent!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"{fn}: argument 'path' must be in a writable directory, {parent!r} is not writable")
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    header = dict(meta)
    header.update(format=FORMAT, format_version=FORMAT_VERSION,
                  tensors={n: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                               "sha256": _digest(t)} for n, t in cpu.items()})
    text = json.dumps(header, sort_keys=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file(cpu, tmp, metadata={_KEY: text})
        os.chmod(tmp, _file_mode(path))  # mkstemp makes it 0600; a bank is built once to be shared
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # the rename itself durable (best effort: not every filesystem allows a directory fsync)
        dfd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _file_mode(path: str) -> int:
    """The permissions the saved file gets: those of the file it replaces, else what ``open()`` would
    give a new file (0666 less the umask)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def read_bank_file(path) -> Tuple[Dict[str, torch.Tensor], dict]:
    """``(tensors on the CPU, meta)`` of a file written by ``write_bank_file``.

    Raises
    ------
    FileNotFoundError, IsADirectoryError; ``BankFileError`` (a ValueError) for a truncated or
    corrupted file, a file that is not a memory bank, or a newer format, naming the file and what
    is wrong.
    """
    from safetensors import safe_open

    fn = "kvmem.MemoryBank.load"
    path = _target(path, fn)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{fn}: no file at {path!r}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            names = list(f.keys())
            tensors = {n: f.get_tensor(n) for n in names}
    except Exception as e:  # safetensors' own errors: truncated file, bad framing, bad header JSON
        raise BankFileError(f"{fn}: {path!r} is not a readable memory bank file (truncated or corrupted "
                            f"safetensors data: {type(e).__name__}: {e})") from None
    if _KEY not in header:
        raise BankFileError(f"{fn}: {path!r} is a safetensors file but not a kvmem memory bank (no {_KEY!r} "
                            f"metadata)")
    try:
        meta = json.loads(header[_KEY])
    except json.JSONDecodeError as e:
        raise BankFileError(f"{fn}: {path!r} has corrupted metadata JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BankFileError(f"{fn}: {path!r} metadata is not a {FORMAT!r} header")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BankFileError(f"{fn}: {path!r} has format_version {version!r}; this kvmem reads <= {FORMAT_VERSION}")
    listed = meta.get("tensors")
    if not isinstance(listed, dict) or set(listed) != set(tensors):
        raise BankFileError(f"{fn}: {path!r} lists tensors {sorted(listed or ())} in its metadata but holds "
                            f"{sorted(tensors)}")
    for name, t in tensors.items():
        want = listed[name]
        if not isinstance(want, dict) or list(t.shape) != want.get("shape") or \
                str(t.dtype).replace("torch.", "") != want.get("dtype"):
            raise BankFileError(f"{fn}: {path!r} tensor {name!r} is {str(t.dtype)} {list(t.shape)}, its metadata "
                                f"says {want!r}")
        if _digest(t) != want.get("sha256"):
            raise BankFileError(f"{fn}: {path!r} tensor {name!r} is corrupted (its bytes do not match the sha256 "
                                f"written with it)")
    return tensors, meta
