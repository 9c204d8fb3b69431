"""Reading a GGUF file without any runtime: header, metadata, tensor types, special tokens; and adding the
end-of-turn token to its metadata (``add_eot_token``, gguf-py's reader and writer).

Reads the header, metadata and tensor table straight from the file (gguf-py's enums and
quant sizes; not its ``GGUFReader``, which decodes every vocabulary entry: 10-100 s on big
vocabularies). Every file is checked here before llama.cpp
sees it, so a missing, truncated or foreign file is a one-line error, never a crash inside
native code.
"""

from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftedge.atomic import atomic_path
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
    tensor_names: list[str] = field(default_factory=list)
    vocab_size: int = 0  # entries of tokenizer.ggml.tokens

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


def has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == GGUF_MAGIC


def inspect_gguf(path: str | Path) -> GgufInfo:
    """Read a GGUF's header, metadata and tensor table; one-line error if missing, truncated or not GGUF."""
    path = Path(path).resolve()
    if not path.is_file():
        raise FtedgeError(f"GGUF file {path} not found", hint="give the path of an existing .gguf file")
    st = path.stat()
    return _inspect_cached(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _inspect_cached(path: Path, size: int, mtime_ns: int) -> GgufInfo:
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise FtedgeError(f"{path} is not a GGUF file (bad magic {magic!r})", hint="give a complete .gguf file")
    if size < 24:
        raise FtedgeError(f"{path} is truncated or damaged ({size} bytes)", hint="re-export or re-download the file")
    import mmap

    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            return _HeaderReader(path, buf).read()
        except (struct.error, IndexError, ValueError, UnicodeDecodeError) as err:
            raise FtedgeError(
                f"{path} is truncated or damaged ({size} bytes; {type(err).__name__}: {err})", hint="re-export or re-download the file"
            ) from None


# GGUF value types (gguf-py's GGUFValueType): struct format of each scalar type
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_SPECIAL_KINDS = ("bos", "eos", "eot", "pad")


class _HeaderReader:
    """Metadata and tensor table of a GGUF, read straight from the mapped file.

    Arrays (the vocabulary, scores, merges) are skipped, not decoded: only the offsets of the
    token strings are kept, to name the special tokens. gguf-py's ``GGUFReader`` builds numpy
    views of every vocabulary entry, which takes 10-100 s on a 50k-260k vocabulary.
    """

    def __init__(self, path: Path, buf: Any) -> None:
        self.path, self.buf, self.pos = path, buf, 4
        version = struct.unpack_from("<I", buf, 4)[0]
        self.endian = "<" if version & 0xFFFF else ">"  # a big-endian file reads as a huge little-endian version
        self.token_offsets: list[int] = []

    def _take(self, fmt: str) -> Any:
        value = struct.unpack_from(self.endian + fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._take("Q")
        end = self.pos + n
        if end > len(self.buf):
            raise ValueError("string past the end of the file")
        text = self.buf[self.pos : end].decode("utf-8", errors="replace")
        self.pos = end
        return text

    def _skip_array(self, key: str) -> None:
        kind, count = self._take("I"), self._take("Q")
        if kind == _STRING:
            keep = key == "tokenizer.ggml.tokens"
            unpack, buf, pos, fmt = struct.unpack_from, self.buf, self.pos, self.endian + "Q"
            offsets = self.token_offsets if keep else None
            for _ in range(count):
                if offsets is not None:
                    offsets.append(pos)
                pos += 8 + unpack(fmt, buf, pos)[0]
            self.pos = pos
        elif kind in _SCALARS:
            self.pos += count * struct.calcsize(_SCALARS[kind])
        elif kind == _ARRAY:  # arrays of arrays: never written by llama.cpp, but legal
            for _ in range(count):
                self._skip_array(key)
        else:
            raise ValueError(f"unknown value type {kind} in {key}")
        if self.pos > len(self.buf):
            raise ValueError(f"{key} runs past the end of the file")

    def _value(self, key: str) -> Any:
        kind = self._take("I")
        if kind == _STRING:
            return self._string()
        if kind in _SCALARS:
            return self._take(_SCALARS[kind])
        if kind == _ARRAY:
            self._skip_array(key)
            return None
        raise ValueError(f"unknown value type {kind} in {key}")

    def _token_text(self, tid: int) -> str:
        n = struct.unpack_from(self.endian + "Q", self.buf, self.token_offsets[tid])[0]
        start = self.token_offsets[tid] + 8
        return self.buf[start : start + n].decode("utf-8", errors="replace")

    def read(self) -> GgufInfo:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        version = self._take("I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old")
        n_tensors, n_kv = self._take("Q"), self._take("Q")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            value = self._value(key)
            if value is not None:
                metadata[key] = value
        tensors: list[tuple[str, int, int, int]] = []  # name, type, offset, n_elements
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._take("Q") for _ in range(self._take("I"))]
            ttype, offset = self._take("I"), self._take("Q")
            tensors.append((name, ttype, offset, math.prod(dims)))
        align = int(metadata.get("general.alignment", 32))
        data_start = -(-self.pos // align) * align
        end, types = 0, {}
        for _, ttype, offset, n in tensors:
            qtype = GGMLQuantizationType(ttype)
            block, type_size = GGML_QUANT_SIZES[qtype]
            end = max(end, data_start + offset + n // block * type_size)
            types[qtype.name] = types.get(qtype.name, 0) + 1
        size = len(self.buf)
        if end > size or not tensors:
            raise FtedgeError(f"{self.path} is truncated ({size} bytes, tensors need {end})", hint="re-export or re-download the file")
        specials = {}
        for kind in _SPECIAL_KINDS:
            tid = metadata.get(f"tokenizer.ggml.{kind}_token_id")
            if isinstance(tid, int) and 0 <= tid < len(self.token_offsets):
                specials[kind] = self._token_text(tid)
        return GgufInfo(
            path=self.path,
            metadata=metadata,
            tensor_types=types,
            special_texts=specials,
            tensor_names=[t[0] for t in tensors],
            vocab_size=len(self.token_offsets),
        )


# -- writing ---------------------------------------------------------------------------------
def add_eot_token(path: Path, eot_id: int) -> None:
    """Rewrite ``path`` with ``tokenizer.ggml.eot_token_id`` added (atomically)."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(path)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE]
    arch_name = bytes(arch.parts[arch.data[0]]).decode()
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch=arch_name, endianess=reader.endianess)
        new = {gguf.Keys.Tokenizer.EOT_ID: MetadataDetails(gguf.GGUFValueType.UINT32, int(eot_id))}
        copy_with_new_metadata(reader, writer, new, [])
    del reader
