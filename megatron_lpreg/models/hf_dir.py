"""The one reader and writer of Hugging Face model directories (``config.json``, generation config, tokenizer files,
safetensors shards and their index).

Nothing else in the package parses these files (transformers and the engines load directories by path): the
model config (``models/qwen.py``), the weight bridge (``models/bridge.py``), conversion (``models/convert.py``),
the tiny model and the rollout engines all come through here. No Qwen knowledge lives here: what a
``config.json`` *says* is read in ``models/qwen.py``; what it must contain for each family is written by
``models/families.py``.

Layout of a directory: ``config.json``; optional ``generation_config.json``; tokenizer files; weights as a single
``model.safetensors`` or as shards listed by ``model.safetensors.index.json`` (``{"weight_map": {name: file}}``).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

from megatron_lpreg.config.base import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["CONFIG_FILE", "GENERATION_CONFIG_FILE", "HF_ASSET_FILES", "HFSafetensors", "HFShards", "INDEX_FILE",
           "TOKENIZER_FILES", "copy_assets", "declared_dtype", "eos_token_ids", "finish_hf_dir", "has_tokenizer",
           "iter_tensors", "read_config", "read_generation_config", "read_rows", "safetensors_files", "tensor_names",
           "torch_dtype", "write_config", "write_index", "write_safetensors", "write_safetensors_file"]

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
"""Either one means the directory has a tokenizer ``AutoTokenizer.from_pretrained`` can load."""
HF_ASSET_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
"""Copied next to exported HF weights when present (the tokenizer and config of the source model)."""

_MAX_LISTED = 20


def listing(names: Iterable[str]) -> str:
    """Sorted, comma-separated, at most 20 names then ``... and N more`` (for error messages)."""
    names = sorted(names)
    more = f" ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


# ---- config.json, generation_config.json, tokenizer --------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def read_config(path: str | os.PathLike, *, missing_ok: bool = False) -> dict[str, Any]:
    """The parsed ``config.json`` of an HF directory (``path`` may also be the file itself).

    Args:
        missing_ok: return ``{}`` when there is no ``config.json`` (or ``path`` is empty) instead of raising.

    Raises:
        ConfigError: no ``config.json`` at the path (unless ``missing_ok``), invalid JSON, or not a JSON object;
            the message names the file.
    """
    if not str(path):
        if missing_ok:
            return {}
        raise ConfigError("no HF model directory given (empty path); pass a directory containing config.json")
    file = Path(path)
    if file.is_dir() or not file.name.endswith(".json"):
        file = file / CONFIG_FILE
    if not file.is_file():
        if missing_ok:
            return {}
        raise ConfigError(f"no HF config at {file}; pass a model directory containing {CONFIG_FILE}")
    return _read_json(file)


def read_generation_config(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``generation_config.json`` of an HF directory, ``{}`` when absent.

    Raises:
        ConfigError: the file exists but is not a valid JSON object.
    """
    file = Path(path) / GENERATION_CONFIG_FILE
    return _read_json(file) if str(path) and file.is_file() else {}


def eos_token_ids(path: str | os.PathLike, config: dict[str, Any] | None = None) -> tuple[int, ...]:
    """Sorted union of ``eos_token_id`` (an int or a list) in ``config.json`` and ``generation_config.json``.

    Args:
        config: the already-parsed ``config.json`` (read from ``path`` when None; a missing file counts as empty).
    """
    sources = [read_config(path, missing_ok=True) if config is None else config, read_generation_config(path)]
    ids: set[int] = set()
    for source in sources:
        eos = source.get("eos_token_id")
        ids.update(int(e) for e in (eos if isinstance(eos, list) else ([eos] if eos is not None else [])))
    return tuple(sorted(ids))


def declared_dtype(config: dict[str, Any]) -> str | None:
    """The dtype name a config declares: ``torch_dtype`` (transformers 4) or ``dtype`` (5), ``torch.`` stripped."""
    name = config.get("torch_dtype") or config.get("dtype")
    return str(name).removeprefix("torch.") if name else None


def torch_dtype(config: dict[str, Any]) -> torch.dtype | None:
    """:func:`declared_dtype` as a ``torch.dtype``; None when absent or not a torch dtype name."""
    name = declared_dtype(config)
    value = getattr(torch, name, None) if name else None
    return value if isinstance(value, torch.dtype) else None


def has_tokenizer(path: str | os.PathLike) -> bool:
    """Whether the directory holds tokenizer files (``tokenizer.json`` or ``tokenizer_config.json``)."""
    return bool(str(path)) and any((Path(path) / f).exists() for f in TOKENIZER_FILES)


# ---- safetensors: listing and reading ----------------------------------------------------------------------------
def _weight_map(root: Path) -> dict[str, str]:
    index = root / INDEX_FILE
    if not index.exists():
        return {}
    data = _read_json(index)
    if not isinstance(data.get("weight_map"), dict):
        raise ValueError(f"{index} has no weight_map object")
    return data["weight_map"]


def safetensors_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of an HF directory: the index's shards (sorted) if there is an index, else every
    ``*.safetensors`` (sorted).

    Raises:
        ValueError: no safetensors (and no index) in the directory.
    """
    root = Path(path)
    weight_map = _weight_map(root)
    files = sorted(set(weight_map.values())) if weight_map else sorted(p.name for p in root.glob("*.safetensors"))
    if not files:
        raise ValueError(f"hf dir {root} has no *.safetensors files (and no {INDEX_FILE}); expected an HF "
                         f"checkpoint directory")
    return [root / f for f in files]


def tensor_names(path: str | os.PathLike) -> list[str]:
    """Every tensor name stored in the directory's safetensors (headers only), in file order."""
    from safetensors import safe_open

    names: list[str] = []
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as handle:
            names.extend(handle.keys())
    return names


def iter_tensors(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream ``(name, tensor)`` from an HF directory one full tensor at a time, file by file."""
    from safetensors import safe_open

    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


def read_rows(path: str | os.PathLike, name: str, rows: int) -> torch.Tensor:
    """The first ``rows`` entries along dim 0 of tensor ``name``, reading only those bytes.

    Raises:
        ValueError: no such tensor in the directory.
    """
    from safetensors import safe_open

    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as handle:
            if name in handle.keys():
                return handle.get_slice(name)[:rows]
    raise ValueError(f"weight '{name}' not found in the safetensors files of {path}")


class HFSafetensors:
    """Lazy, read-only, sliceable view of an HF directory's safetensors (single file or sharded with an index).

    Every file's header is checked on construction, so a missing, truncated or corrupt shard fails before any
    weight is read. Each :meth:`read` maps the file only for the duration of that read: pages of a file that
    stayed mapped would count in this process' resident set until the end of the load.

    Raises:
        ValueError: no safetensors in ``hf_dir``, an index naming a missing file or a tensor not in that file, a
            tensor stored twice, or an unreadable file.
    """

    def __init__(self, hf_dir: str | os.PathLike) -> None:
        from safetensors import safe_open

        self.hf_dir = Path(hf_dir)
        weight_map = _weight_map(self.hf_dir)
        files = [f.name for f in safetensors_files(self.hf_dir)]
        missing = [f for f in files if not (self.hf_dir / f).is_file()]
        if missing:
            raise ValueError(f"hf dir {self.hf_dir}: shard file(s) listed in {INDEX_FILE} are missing: "
                             f"{listing(missing)}")
        self._file_of: dict[str, str] = {}
        self._shapes: dict[str, list[int]] = {}
        for name in files:
            try:
                with safe_open(str(self.hf_dir / name), framework="pt") as handle:
                    keys = {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}
            except Exception as exc:  # safetensors raises its own error types for bad headers / short files
                raise ValueError(f"hf dir {self.hf_dir}: shard {name} is truncated or corrupt ({exc})") from exc
            for key, shape in keys.items():
                if key in self._file_of:
                    raise ValueError(f"hf dir {self.hf_dir}: tensor {key} is stored twice "
                                     f"({self._file_of[key]} and {name})")
                self._file_of[key], self._shapes[key] = name, shape
        stale = {k for k, f in weight_map.items() if self._file_of.get(k) != f}
        if stale:
            raise ValueError(f"hf dir {self.hf_dir}: {INDEX_FILE} names tensors not found in the listed shard: "
                             f"{listing(stale)}")

    def names(self) -> set[str]:
        """Every stored tensor name."""
        return set(self._file_of)

    def shape(self, name: str) -> list[int]:
        """The stored shape of tensor ``name``."""
        return list(self._shapes[name])

    def read(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows (``dim=0``) or columns (``dim=1``) ``[start, stop)`` of tensor ``name``; reads only those bytes."""
        from safetensors import safe_open

        if dim not in (0, 1):
            raise ValueError(f"read({name}): dim={dim}; only 0 and 1 are split")
        with safe_open(str(self.hf_dir / self._file_of[name]), framework="pt") as handle:
            tensor_slice = handle.get_slice(name)
            return tensor_slice[start:stop] if dim == 0 else tensor_slice[:, start:stop]


# ---- writing -----------------------------------------------------------------------------------------------------
class HFShards(NamedTuple):
    """What :func:`write_safetensors` wrote."""

    weight_map: dict[str, str]
    """``{hf_name: file_name}``."""
    total_bytes: int
    """Sum of tensor bytes (the index's ``total_size``)."""


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors_file(tensors: dict[str, torch.Tensor], file: str | os.PathLike) -> None:
    """Write one safetensors file straight from the tensors' memory, in the dict's order.

    Format (safetensors spec): u64 little-endian header size, a JSON header naming each tensor's dtype, shape
    and ``[begin, end)`` byte range in the data section (contiguous, in order), padded with spaces to 8 bytes,
    then the raw little-endian bytes. ``safetensors.torch.save_file`` first serialises every tensor to a
    ``bytes`` copy, which doubles the peak for the largest tensor.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(file, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for tensor in tensors.values():
            if tensor.numel():
                handle.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)


def write_safetensors(stream: Iterable[tuple[str, torch.Tensor]], out_dir: str | os.PathLike, *,
                      prefix: str = "model", max_shard_bytes: int = 2**30) -> HFShards:
    """Write a tensor stream as safetensors shards of at most ``max_shard_bytes`` (a bigger tensor gets its own).

    Memory stays near ``max_shard_bytes`` plus one tensor. Files are named ``{prefix}-{i:05d}.safetensors``;
    the caller writes the index (:func:`write_index` or :func:`finish_hf_dir`), possibly merging several
    writers' maps.

    Raises:
        ValueError: a name appears twice in the stream.
    """
    out_dir = Path(out_dir)
    weight_map: dict[str, str] = {}
    pending: dict[str, torch.Tensor] = {}
    pending_bytes, total_bytes = 0, 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            file_name = f"{prefix}-{len(set(weight_map.values())) + 1:05d}.safetensors"
            write_safetensors_file(pending, out_dir / file_name)
            weight_map.update(dict.fromkeys(pending, file_name))
            pending, pending_bytes = {}, 0

    for name, tensor in stream:
        if name in weight_map or name in pending:
            raise ValueError(f"tensor {name} appears twice in the export stream")
        size = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + size > max_shard_bytes:
            flush()
        pending[name] = tensor.contiguous()
        pending_bytes += size
        total_bytes += size
        del tensor
        if pending_bytes >= max_shard_bytes:  # write a full (or single oversized) shard before pulling more
            flush()
    flush()
    return HFShards(weight_map, total_bytes)


def write_index(out_dir: str | os.PathLike, weight_map: dict[str, str], total_bytes: int) -> None:
    """Write ``model.safetensors.index.json`` for the shards in ``out_dir``."""
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (Path(out_dir) / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def write_config(out_dir: str | os.PathLike, config: dict[str, Any], name: str = CONFIG_FILE) -> Path:
    """Write ``config`` as ``out_dir/name`` (``config.json`` by default): indented, sorted keys, final newline."""
    file = Path(out_dir) / name
    file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return file


def copy_assets(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the :data:`HF_ASSET_FILES` that exist in ``src`` (config, generation config, tokenizer) to ``dst``;
    return the names copied."""
    copied = []
    for name in HF_ASSET_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def finish_hf_dir(tmp: Path, shard_maps: list[HFShards], assets: Path | None, config: dict[str, Any]) -> None:
    """Name the shards ``model-0000i-of-0000n``, write the index, copy config/tokenizer files from ``assets``
    (else write ``config`` as config.json). Run once (rank 0) after every writer finished."""
    files = [f for m in shard_maps for f in dict.fromkeys(m.weight_map.values())]
    renamed = {old: f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, old in enumerate(files)}
    for old, new in renamed.items():
        os.replace(tmp / old, tmp / new)
    weight_map = {name: renamed[f] for m in shard_maps for name, f in m.weight_map.items()}
    write_index(tmp, weight_map, sum(m.total_bytes for m in shard_maps))
    copied = copy_assets(assets, tmp) if assets is not None else []
    if CONFIG_FILE not in copied:
        write_config(tmp, config)
    logger.info("wrote %d tensors in %d files; copied %s", len(weight_map), len(files), copied or "no assets")
