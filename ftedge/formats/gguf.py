"""Reading a GGUF file without any runtime: header, metadata, tensor types, special tokens.

Uses gguf-py's own ``GGUFReader`` and enums. Every file is checked here before llama.cpp
sees it, so a missing, truncated or foreign file is a one-line error, never a crash inside
native code.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftedge.errors import FtedgeError
from ftedge.formats.quants import gguf_type_name

GGUF_MAGIC = b"GGUF"
FLOAT_TENSOR_TYPES = {"F32", "F16", "BF16", "F64"}


@dataclass
class GgufInfo:
    """What the ``gguf`` reader says about a file: metadata and tensor types."""

    path: Path
    metadata: dict[str, Any]
    tensor_types: dict[str, int] = field(default_factory=dict)  # type name -> tensor count
    special_texts: dict[str, str] = field(default_factory=dict)  # bos/eos/eot/pad -> token text

    @property
    def quantized(self) -> bool:
        return any(t not in FLOAT_TENSOR_TYPES for t in self.tensor_types)

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    @property
    def architecture(self) -> str | None:
        """llama.cpp's architecture name (``llama``, ``qwen2``, ``gemma3``, ...)."""
        return self.metadata.get("general.architecture")

    @property
    def context_length(self) -> int | None:
        """The context length the model was trained with (``<arch>.context_length``), None when absent."""
        arch = self.architecture
        value = self.metadata.get(f"{arch}.context_length") if arch else None
        return int(value) if isinstance(value, int) and value > 0 else None

    @property
    def quant(self) -> str | None:
        """The file's GGUF type name from ``general.file_type`` (``q4_k_m``), None when unknown."""
        ftype = self.metadata.get("general.file_type")
        return gguf_type_name(ftype) if isinstance(ftype, int) else None

    @property
    def stop_texts(self) -> list[str]:
        """Texts of the end-of-turn and end-of-sequence tokens (what every runtime stops on), EOT first."""
        texts = self.special_texts
        return [t for t in dict.fromkeys([texts.get("eot"), texts.get("eos")]) if t]

    def token_id(self, key: str) -> int | None:
        value = self.metadata.get(f"tokenizer.ggml.{key}_token_id")
        return int(value) if value is not None else None


def _field_value(f: Any) -> Any:
    """Decode a scalar or string GGUF field (arrays are skipped: vocabularies are large)."""
    import gguf

    types = list(f.types)
    if not types or types[0] == gguf.GGUFValueType.ARRAY:
        return None
    part = f.parts[f.data[0]]
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8", errors="replace")
    return part.tolist()[0] if hasattr(part, "tolist") else part


def has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == GGUF_MAGIC


def read_gguf_header(path: str | Path, keys: tuple[str, ...] = ("general.architecture", "general.name")) -> dict[str, Any]:
    """Scalar and string metadata ``keys`` read from the start of a GGUF, without the tensor table or vocabulary.

    Cheap (stops once every key is found; ``general.architecture`` comes first in files llama.cpp
    writes), so ``ftedge validate`` can check a base model without loading it. One-line errors for a
    missing file, a file without the GGUF magic, or a header that ends early.
    """
    import gguf
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FtedgeError(f"GGUF file {path} not found", hint="give the path of an existing .gguf file")
    wanted, found = set(keys), {}
    scalars = gguf.GGUFReader.gguf_scalar_to_np
    with open(path, "rb") as fh:
        magic = fh.read(4)
        if magic != GGUF_MAGIC:
            raise FtedgeError(f"{path} is not a GGUF file (it does not start with the GGUF magic; got {magic!r})", hint="give a .gguf file")
        try:
            order = "<"
            (version,) = struct.unpack("<I", _exactly(fh, 4))
            if version & 0xFFFF == 0:  # a big-endian file
                order, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
            if version < 2:
                raise FtedgeError(f"{path}: GGUF version {version} is too old", hint="re-convert the model with a current llama.cpp")
            _n_tensors, n_kv = struct.unpack(order + "QQ", _exactly(fh, 16))

            def text() -> str:
                (n,) = struct.unpack(order + "Q", _exactly(fh, 8))
                return _exactly(fh, n).decode("utf-8", errors="replace")

            def value(vtype: int, keep: bool) -> Any:
                if vtype == gguf.GGUFValueType.STRING:
                    return text()
                if vtype == gguf.GGUFValueType.ARRAY:
                    item, count = struct.unpack(order + "IQ", _exactly(fh, 12))
                    for _ in range(count):
                        value(item, False)
                    return None
                dtype = np.dtype(scalars[gguf.GGUFValueType(vtype)]).newbyteorder(order)
                raw = _exactly(fh, dtype.itemsize)
                return np.frombuffer(raw, dtype=dtype)[0].item() if keep else None

            for _ in range(n_kv):
                key = text()
                (vtype,) = struct.unpack(order + "I", _exactly(fh, 4))
                got = value(vtype, key in wanted)
                if key in wanted:
                    found[key] = got
                    if wanted <= set(found):
                        break
        except (struct.error, EOFError, ValueError, KeyError) as err:
            raise FtedgeError(
                f"{path}: the GGUF header is truncated or damaged ({err})", hint="re-export or re-download the file"
            ) from None
    return found


def _exactly(fh: Any, n: int) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise EOFError(f"the file ends early (wanted {n} bytes at offset {fh.tell()})")
    return data


def inspect_gguf(path: str | Path) -> GgufInfo:
    """Read a GGUF's header, metadata and tensor table; one-line error if missing, truncated or not GGUF."""
    path = Path(path).resolve()
    if not path.is_file():
        raise FtedgeError(f"GGUF file {path} not found", hint="give the path of an existing .gguf file")
    st = path.stat()
    return _inspect_cached(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _inspect_cached(path: Path, size: int, mtime_ns: int) -> GgufInfo:
    import gguf

    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise FtedgeError(f"{path} is not a GGUF file (bad magic {magic!r})", hint="give a complete .gguf file")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:  # numpy errors when the file ends early
        raise FtedgeError(
            f"{path} is truncated or damaged ({size} bytes; {type(err).__name__}: {err})", hint="re-export or re-download the file"
        ) from None
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size or not reader.tensors:
        raise FtedgeError(f"{path} is truncated ({size} bytes, tensors need {end})", hint="re-export or re-download the file")
    metadata = {}
    for name, f in reader.fields.items():
        value = _field_value(f)
        if value is not None:
            metadata[name] = value
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    specials: dict[str, str] = {}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    for kind in ("bos", "eos", "eot", "pad"):
        tid = metadata.get(f"tokenizer.ggml.{kind}_token_id")
        if tokens is not None and isinstance(tid, int) and 0 <= tid < len(tokens.data):
            specials[kind] = bytes(tokens.parts[tokens.data[tid]]).decode("utf-8", errors="replace")
    return GgufInfo(path=path, metadata=metadata, tensor_types=types, special_texts=specials)
