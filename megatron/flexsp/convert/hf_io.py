"""Reading and writing Hugging Face model directories (config.json + safetensors), checked first.

Why check before loading: a multi-gigabyte import must not stop half-way on a missing shard or a
tensor of the wrong shape; every shard's presence and every tensor's name and shape (from the
safetensors headers, no data read) are verified before any tensor is loaded or anything written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import ConvertError

__all__ = [
    "INDEX_FILE",
    "SINGLE_FILE",
    "check_hf_tensors",
    "copy_tokenizer",
    "fresh_output",
    "read_hf_config",
    "read_hf_tensors",
    "weight_files",
    "write_hf_dir",
]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Never copied from a --tokenizer directory: the exported model's own files.
_MODEL_FILES = ("config.json", SINGLE_FILE, INDEX_FILE)


def _safetensors():
    try:
        import safetensors  # noqa: F401
        import safetensors.torch
    except ImportError:
        raise ConvertError("flexsp-convert needs safetensors: pip install 'flexsp-megatron[hf]'") from None
    return safetensors


def read_hf_config(hf_dir: Path) -> dict:
    """config.json of ``hf_dir`` as a dict."""
    if not hf_dir.is_dir():
        raise ConvertError(f"--hf {hf_dir}: not a directory")
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConvertError(f"--hf {hf_dir}: no config.json")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConvertError(f"{path}: must hold a JSON object")
    return cfg


def weight_files(hf_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file said to hold it (the index of a sharded checkpoint, or
    the one file); every shard must exist."""
    index = hf_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConvertError(f"{index}: not a safetensors index with a weight_map ({e})") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConvertError(f"{index}: weight_map must be a non-empty object")
        files = {name: hf_dir / str(shard) for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise ConvertError(f"{index} names shard {shard.name}, which is missing from {hf_dir}")
        return files
    single = hf_dir / SINGLE_FILE
    if single.is_file():
        with _safetensors().safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    if any(hf_dir.glob("*.bin")):
        raise ConvertError(f"--hf {hf_dir}: only safetensors weights are supported (found *.bin files)")
    raise ConvertError(f"--hf {hf_dir}: no {SINGLE_FILE} and no {INDEX_FILE}")


def _header_shapes(files: Mapping[str, Path]) -> dict[str, tuple[int, ...]]:
    st = _safetensors()
    shapes: dict[str, tuple[int, ...]] = {}
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        try:
            with st.safe_open(str(path), framework="pt") as f:
                present = set(f.keys())
                for name in names:
                    if name not in present:
                        raise ConvertError(f"{path.name}: the index says it holds {name!r}, but it does not")
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        except ConvertError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged shard, reported by name
            raise ConvertError(f"{path}: not a readable safetensors file ({e})") from None
    return shapes


def check_hf_tensors(files: Mapping[str, Path], expected: Mapping[str, tuple[int, ...]]) -> None:
    """Every expected tensor present with its shape, and no other (rotary caches aside)."""
    shapes = _header_shapes(files)
    extra = sorted(n for n in shapes if n not in expected and not n.endswith("rotary_emb.inv_freq"))
    if extra:
        raise ConvertError(f"unexpected tensor {extra[0]!r} {list(shapes[extra[0]])} for this config.json")
    for name, shape in expected.items():
        if name not in shapes:
            raise ConvertError(f"tensor {name!r} is missing from the checkpoint")
        if tuple(shapes[name]) != tuple(shape):
            raise ConvertError(f"tensor {name!r} has shape {list(shapes[name])}, config.json implies {list(shape)}")


def read_hf_tensors(
    files: Mapping[str, Path], names: list[str], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The tensors ``names`` (already checked), loaded shard by shard, each converted to ``dtype`` as
    it is read (the file's dtype is never held for the whole model next to the converted one)."""
    st = _safetensors()
    out: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    for path, group in by_file.items():
        with st.safe_open(str(path), framework="pt") as f:
            for name in group:
                t = f.get_tensor(name)
                if not t.is_floating_point():
                    raise ConvertError(f"tensor {name!r} has dtype {t.dtype}; quantized weights are not supported")
                out[name] = t if dtype is None else t.to(dtype)
    return out


@contextmanager
def fresh_output(out: Path, flag: str) -> Iterator[Path]:
    """A temporary sibling directory of ``out``, renamed to ``out`` when the block succeeds and
    removed when it fails: nothing appears at ``out`` unless the conversion completed."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"{flag} {out} already exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_hf_dir(out: Path, config: Mapping, tensors: Mapping[str, torch.Tensor]) -> None:
    """config.json + model.safetensors into the (new) directory ``out``."""
    st = _safetensors()
    (out / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    st.torch.save_file(dict(tensors), str(out / SINGLE_FILE), metadata={"format": "pt"})


def copy_tokenizer(src: Path, out: Path) -> list[str]:
    """Copy the tokenizer files of ``src`` (every plain file but the model's own) into ``out``."""
    if not src.is_dir():
        raise ConvertError(f"--tokenizer {src}: not a directory")
    copied = []
    for path in sorted(src.iterdir()):
        if path.is_file() and path.name not in _MODEL_FILES and path.suffix not in (".safetensors", ".bin"):
            shutil.copy2(path, out / path.name)
            copied.append(path.name)
    return copied
