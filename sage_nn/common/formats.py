"""Files a run reads, checked from their headers alone, without torch or the model.

A damaged weights file otherwise surfaces minutes into a run, after the model has loaded
and discovery has run, or as a traceback from deep inside a loader. These readers look
only at what says where the data is (a safetensors JSON header, a GGUF header and tensor
table) and at the file's size, so they answer in milliseconds and raise
:class:`FormatError` with a plain sentence::

    safetensors_header("sae/sae_weights.safetensors")   # {name: {dtype, shape, ...}}
    sae_weights_problem(Path("sae"), cfg)                # None, or what is wrong
    gguf_problem(Path("model.gguf"))                     # None, or what is wrong
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FormatError", "SAE_ARCHITECTURES", "REFUSED_ARCHITECTURES", "SAEArchitecture",
           "architecture_problem", "TRAINABLE", "TRAINED_TRANSCODERS", "TRANSCODER_TRAINER_VERSION", "SAE_WEIGHTS", "safetensors_header",
           "safetensors_problem", "sae_weights_problem", "gguf_problem",
           "model_weights_problem"]



@dataclass(frozen=True)
class SAEArchitecture:
    """What sage_nn knows of one sae_lens inference architecture (``cfg.architecture()``):
    the ``activation`` its encoder applies (:class:`~..dictionaries.saes.SparseAutoencoder` runs
    it), the ``tensors`` its weights file holds, whether it is a ``transcoder`` (reads one
    site, writes another of width ``d_out``) with a linear ``skip`` path, and whether its
    encoder is ``tied`` to its decoder (no ``W_enc`` stored)."""

    activation: str
    tensors: tuple[str, ...]
    transcoder: bool = False
    skip: bool = False
    tied: bool = False


_DICT = ("W_dec", "b_dec")
#: SAE architectures sage_nn loads (:class:`~..dictionaries.saes.SparseAutoencoder`), by sae_lens's
#: name: every inference class of sae_lens 6.54 but :data:`REFUSED_ARCHITECTURES` ...
SAE_ARCHITECTURES = {
    "standard": SAEArchitecture("relu", ("W_enc", "b_enc", *_DICT)),
    "topk": SAEArchitecture("topk", ("W_enc", "b_enc", *_DICT)),
    "abstopk": SAEArchitecture("abstopk", ("W_enc", "b_enc", *_DICT)),
    "jumprelu": SAEArchitecture("jumprelu", ("W_enc", "b_enc", "threshold", *_DICT)),
    "gated": SAEArchitecture("gated", ("W_enc", "b_gate", "r_mag", "b_mag", *_DICT)),
    "matching_pursuit": SAEArchitecture("matching_pursuit", _DICT, tied=True),
    "transcoder": SAEArchitecture("relu", ("W_enc", "b_enc", *_DICT), transcoder=True),
    "skip_transcoder": SAEArchitecture("relu", ("W_enc", "b_enc", "W_skip", *_DICT),
                                       transcoder=True, skip=True),
    "jumprelu_transcoder": SAEArchitecture("jumprelu", ("W_enc", "b_enc", "threshold", *_DICT),
                                           transcoder=True),
    "jumprelu_skip_transcoder": SAEArchitecture(
        "jumprelu", ("W_enc", "b_enc", "threshold", "W_skip", *_DICT), transcoder=True,
        skip=True),
}
#: ... and those it refuses, with the reason (said before anything runs).
REFUSED_ARCHITECTURES = {
    "temporal": "its codes at a token depend on the earlier tokens (attention over the "
                "context's codes), so a site's codes are not a function of the site's "
                "activation at that token, which every metric here perturbs",
}
#: The shape of each tensor an SAE's weights file holds, in terms of its cfg.json.
SAE_TENSOR_SHAPES = {"W_enc": ("d_in", "d_sae"), "b_enc": ("d_sae",), "W_dec": ("d_sae", "d_out"),
                     "b_dec": ("d_out",), "threshold": ("d_sae",), "b_gate": ("d_sae",),
                     "r_mag": ("d_sae",), "b_mag": ("d_sae",), "W_skip": ("d_out", "d_in")}


def architecture_problem(arch: str) -> str | None:
    """Why sage_nn cannot read SAEs of sae_lens architecture ``arch`` (None: it can)."""
    if arch in SAE_ARCHITECTURES:
        return None
    if arch in REFUSED_ARCHITECTURES:
        return f"sae_lens architecture {arch!r} cannot be evaluated here: " \
            f"{REFUSED_ARCHITECTURES[arch]}"
    return (f"sae_lens architecture {arch!r} is not supported; supported: "
            f"{', '.join(SAE_ARCHITECTURES)}")


#: ... and those it trains (:mod:`sage_nn.dictionaries.training`), by sae_lens's training names.
TRAINABLE = ("standard", "topk", "batchtopk", "matryoshka_batchtopk", "jumprelu", "gated",
             "transcoder", "skip_transcoder")
#: the trainable transcoders (of an MLP, :mod:`sage_nn.dictionaries.transcoding`): whether
#: each adds a linear skip path
TRAINED_TRANSCODERS = {"transcoder": False, "skip_transcoder": True}
#: part of the cache name of trained transcoders: those of an earlier loop are not taken
TRANSCODER_TRAINER_VERSION = "tc2"
#: The weights file sae_lens writes next to cfg.json (``SAE.save_model``) and reads back.
SAE_WEIGHTS = "sae_weights.safetensors"

_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                      "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
                      "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library refuses larger headers too


class FormatError(ValueError):
    """A file whose header does not parse or does not fit its size; the message says how."""


def _bytes(n: int) -> str:
    return f"{n:,} bytes"


def safetensors_header(path: str | Path) -> dict[str, dict]:
    """The tensors a safetensors file declares, ``{name: {"dtype", "shape", "data_offsets"}}``,
    once its header parses and every tensor's bytes lie inside the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FormatError(f"is {_bytes(size)} long, shorter than the 8-byte header length: "
                              "it is truncated or not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            raise FormatError(f"declares a {_bytes(n)} header but the file is {_bytes(size)}: "
                              "it is truncated or not a safetensors file")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except ValueError as err:  # UnicodeDecodeError is a ValueError too
        raise FormatError(f"has a header that is not JSON ({str(err)[:80]}): it is damaged "
                          "or not a safetensors file") from None
    if not isinstance(header, dict):
        raise FormatError("has a header that is not a JSON object: it is damaged")
    data = size - 8 - n
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = info["dtype"], [int(d) for d in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
            width = _SAFETENSORS_BYTES[dtype]
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"declares tensor {name!r} without a known dtype, shape and "
                              "data_offsets: the header is damaged") from None
        if end - begin != math.prod(shape) * width or begin < 0:
            raise FormatError(f"declares tensor {name!r} of shape {shape} ({dtype}) in "
                              f"{end - begin} bytes: the header is damaged")
        if end > data:
            raise FormatError(f"is {_bytes(size)} long but tensor {name!r} ends "
                              f"{_bytes(8 + n + end)} in: the file is truncated")
        tensors[name] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
    return tensors


def safetensors_problem(path: str | Path) -> str | None:
    """What is wrong with a safetensors file's header and size, or None."""
    try:
        safetensors_header(path)
    except FormatError as err:
        return f"{Path(path).name} {err}"
    except OSError as err:
        return f"{Path(path).name} cannot be read ({err.strerror or err})"
    return None


def _expected_sae_tensors(cfg: dict) -> dict[str, tuple[int, ...]] | None:
    """``{name: shape}`` sae_lens's loader needs for this cfg.json (None: d_in/d_sae unknown
    or an architecture sage_nn does not read). A JumpReLU SAE may keep ``log_threshold``
    instead of ``threshold`` (older checkpoints)."""
    d_in, d_sae = cfg.get("d_in"), cfg.get("d_sae")
    spec = SAE_ARCHITECTURES.get(cfg.get("architecture", "standard"))
    if not (isinstance(d_in, int) and isinstance(d_sae, int)) or spec is None:
        return None
    dims = {"d_in": d_in, "d_sae": d_sae,
            "d_out": cfg.get("d_out", d_in) if spec.transcoder else d_in}
    if not isinstance(dims["d_out"], int):
        return None
    return {name: tuple(dims[d] for d in SAE_TENSOR_SHAPES[name]) for name in spec.tensors}


def sae_weights_problem(directory: str | Path, cfg: dict) -> str | None:
    """What is wrong with an SAE directory's ``sae_weights.safetensors`` given its
    ``cfg.json`` (parsed: ``cfg``): missing, a header that does not parse or does not fit the
    file's size, or tensors whose names or shapes are not those the cfg's d_in and d_sae
    imply. None when it would load."""
    path = Path(directory) / SAE_WEIGHTS
    if not path.is_file():
        others = sorted(p.name for p in Path(directory).glob("*.safetensors"))
        return (f"no {SAE_WEIGHTS} next to cfg.json (it holds {', '.join(others)}, which "
                "sae_lens does not read)") if others else None
    try:
        tensors = safetensors_header(path)
    except FormatError as err:
        return f"{SAE_WEIGHTS} {err}"
    except OSError as err:
        return f"{SAE_WEIGHTS} cannot be read ({err.strerror or err})"
    expected = _expected_sae_tensors(cfg)
    if expected is None:
        return None
    if "threshold" in expected and "threshold" not in tensors and "log_threshold" in tensors:
        expected["log_threshold"] = expected.pop("threshold")
    missing = [n for n in expected if n not in tensors]
    if missing:
        return (f"{SAE_WEIGHTS} lacks tensor(s) {', '.join(missing)} that a "
                f"{cfg.get('architecture', 'standard')} SAE needs (it holds "
                f"{', '.join(sorted(tensors)) or 'none'})")
    for name, shape in expected.items():
        if tuple(tensors[name]["shape"]) != shape:
            return (f"{SAE_WEIGHTS} holds {name} of shape {list(tensors[name]['shape'])}, but "
                    f"cfg.json (d_in={cfg['d_in']}, d_sae={cfg['d_sae']}"
                    + (f", d_out={cfg['d_out']}" if "d_out" in cfg else "")
                    + f") implies {list(shape)}")
    return None


def model_weights_problem(directory: str | Path) -> str | None:
    """What is wrong with the weights of a HuggingFace model directory: no weight file, a
    shard its index names that is missing, or a safetensors file whose header does not
    parse or does not fit its size. None when they look whole."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"{index.name} is not a readable shard index"
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            return f"{index.name} names shard(s) {', '.join(missing[:3])} that are missing"
    files = sorted(directory.glob("*.safetensors"))
    if not files and not any(directory.glob("*.bin")):
        return "holds no weights (no *.safetensors or *.bin file next to config.json)"
    for path in files:
        problem = safetensors_problem(path)
        if problem:
            return problem
    return None


# -- GGUF ------------------------------------------------------------------------------------

_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Reader:
    """Little-endian reads from a buffer; reading past its end raises :class:`FormatError`
    naming the section that was cut."""

    def __init__(self, buffer, size: int):
        self.buffer, self.size, self.pos, self.section = buffer, size, 0, "header"

    def take(self, fmt: str):
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise FormatError(f"ends inside its {self.section} (at byte {self.size:,}): "
                              "the file is truncated")
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += n
        return value

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise FormatError(f"ends inside its {self.section} (at byte {self.size:,}): "
                              "the file is truncated")
        self.pos += n

    def string(self) -> str:
        n = self.take("<Q")
        start = self.pos
        self.skip(n)
        return bytes(self.buffer[start:self.pos]).decode("utf-8", "replace")

    def value(self, kind: int):
        if kind in _GGUF_SCALARS:
            return self.take(_GGUF_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.take("<I"), self.take("<Q")
            if item in _GGUF_SCALARS:  # fixed width: skipped without reading each value
                self.skip(count * struct.calcsize(_GGUF_SCALARS[item]))
            else:
                if count > self.size:
                    raise FormatError(f"declares an array of {count:,} values in its "
                                      f"{self.section}: the file is damaged")
                for _ in range(count):
                    self.value(item)
            return None
        raise FormatError(f"has a metadata value of unknown type {kind} in its {self.section}: "
                          "the file is damaged or of a newer GGUF version")


def _ggml_sizes() -> dict[int, tuple[int, int]]:
    """``{ggml type: (block size, bytes per block)}`` from the gguf package."""
    from gguf.constants import GGML_QUANT_SIZES

    return {int(k): v for k, v in GGML_QUANT_SIZES.items()}


def gguf_problem(path: str | Path) -> str | None:
    """What is wrong with a GGUF file: not GGUF, a header, metadata or tensor table that
    does not parse, or tensor data past the file's end. None when it would load."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size < 24:
                return (f"is {_bytes(size)} long, shorter than a GGUF header: it is truncated "
                        "or not a GGUF file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
                return _gguf_table(buffer, size)
    except FormatError as err:
        return str(err)
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"


def _gguf_table(buffer, size: int) -> str | None:
    r = _Reader(buffer, size)
    if bytes(buffer[:4]) != b"GGUF":
        return "does not start with the GGUF magic bytes: it is not a GGUF file"
    r.skip(4)
    version = r.take("<I")
    if version not in (2, 3):
        return f"has GGUF version {version}; fix the file or convert it again (versions 2, 3)"
    n_tensors, n_kv = r.take("<Q"), r.take("<Q")
    if n_tensors > size or n_kv > size:
        return (f"declares {n_tensors:,} tensors and {n_kv:,} metadata entries in "
                f"{_bytes(size)}: the header is damaged")
    r.section, alignment = "metadata", 32
    for _ in range(n_kv):
        key, kind = r.string(), r.take("<I")
        value = r.value(kind)
        if key == "general.alignment" and isinstance(value, int) and value > 0:
            alignment = value
    r.section, sizes, tensors = "tensor table", _ggml_sizes(), []
    for _ in range(n_tensors):
        name, n_dims = r.string(), r.take("<I")
        if n_dims > 8:
            return f"declares tensor {name!r} with {n_dims} dimensions: the table is damaged"
        dims = [r.take("<Q") for _ in range(n_dims)]
        kind, offset = r.take("<I"), r.take("<Q")
        if kind not in sizes:
            return (f"declares tensor {name!r} of unknown ggml type {kind}: the table is "
                    "damaged or the file needs a newer gguf package")
        block, width = sizes[kind]
        tensors.append((name, offset, math.prod(dims) // block * width))
    data = -(-r.pos // alignment) * alignment  # tensor data starts at the next alignment
    for name, offset, nbytes in tensors:
        if data + offset + nbytes > size:
            return (f"is {_bytes(size)} long but tensor {name!r} ends "
                    f"{_bytes(data + offset + nbytes)} in: the file is truncated")
    return None

