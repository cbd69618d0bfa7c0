"""A model's parameters as one contiguous buffer plus a layout.

Every tensor is a view into the buffer, so aggregating, copying or sending a model
is one operation on one block of memory, never a loop over separately allocated
arrays. Tensors are packed back to back in layout order with no gaps, which is
exactly the data section of a safetensors file (see ``codec``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from strato.errors import LayoutError

__all__ = ["DTYPES", "Layout", "Params", "TensorSpec", "dtype_name"]

# safetensors dtype names -> numpy storage dtype. numpy has no bfloat16: BF16 tensors
# are stored bit for bit as uint16 and converted only at the torch boundary.
DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_BY_NUMPY: dict[np.dtype[Any], str] = {v: k for k, v in DTYPES.items() if k not in ("BF16",)}


def dtype_name(dtype: npt.DTypeLike) -> str:
    """The safetensors name of a numpy dtype (``float32`` -> ``F32``)."""
    dt = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).byteorder == ">" else np.dtype(dtype)
    try:
        return _BY_NUMPY[dt]
    except KeyError:
        raise LayoutError(f"dtype {dt} is not supported (supported: {', '.join(DTYPES)})") from None


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a layout: where it lives in the flat buffer and what it is."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype].itemsize

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


@dataclass(frozen=True)
class Layout:
    """Names, dtypes and shapes of a model's tensors, packed back to back."""

    tensors: tuple[TensorSpec, ...]

    @classmethod
    def of(cls, entries: Iterable[tuple[str, str, Iterable[int]]]) -> Layout:
        """Build a packed layout from ``(name, dtype, shape)`` entries, in order."""
        specs: list[TensorSpec] = []
        seen: set[str] = set()
        offset = 0
        for name, dtype, shape in entries:
            if not isinstance(name, str) or not name:
                raise LayoutError(f"tensor name must be a non-empty string, got {name!r}")
            if name == "__metadata__":
                raise LayoutError("'__metadata__' is reserved by safetensors, not a tensor name")
            if name in seen:
                raise LayoutError(f"tensor {name!r} appears twice in the layout")
            if dtype not in DTYPES:
                raise LayoutError(f"tensor {name!r}: unknown dtype {dtype!r}")
            dims = tuple(int(d) for d in shape)
            if any(d < 0 for d in dims):
                raise LayoutError(f"tensor {name!r}: negative dimension in {dims}")
            seen.add(name)
            spec = TensorSpec(name, dtype, dims, offset)
            specs.append(spec)
            offset = spec.end
        return cls(tuple(specs))

    @property
    def nbytes(self) -> int:
        return self.tensors[-1].end if self.tensors else 0

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    def dtype(self) -> str | None:
        """The one dtype shared by every tensor, or None for a mixed layout."""
        kinds = {t.dtype for t in self.tensors}
        return kinds.pop() if len(kinds) == 1 else None

    def spec(self, name: str) -> TensorSpec:
        for t in self.tensors:
            if t.name == name:
                return t
        raise LayoutError(f"no tensor named {name!r} in the layout")

    def to_json(self) -> str:
        return json.dumps([[t.name, t.dtype, list(t.shape)] for t in self.tensors])

    @classmethod
    def from_json(cls, text: str) -> Layout:
        try:
            rows = json.loads(text)
            return cls.of((str(n), str(d), [int(x) for x in s]) for n, d, s in rows)
        except (ValueError, TypeError) as exc:
            raise LayoutError(f"malformed layout JSON: {exc}") from None

    def describe_mismatch(self, other: Layout) -> str:
        """A one-line reason two layouts differ ('' when they are equal)."""
        if self == other:
            return ""
        mine, theirs = {t.name: t for t in self.tensors}, {t.name: t for t in other.tensors}
        for name in mine.keys() - theirs.keys():
            return f"tensor {name!r} is missing"
        for name in theirs.keys() - mine.keys():
            return f"unexpected tensor {name!r}"
        for name, t in mine.items():
            o = theirs[name]
            if (t.dtype, t.shape) != (o.dtype, o.shape):
                want, got = f"{t.dtype}{list(t.shape)}", f"{o.dtype}{list(o.shape)}"
                return f"tensor {name!r}: expected {want}, got {got}"
        return "tensors are in a different order"


class Params:
    """A layout and the one contiguous byte buffer that holds all its tensors."""

    __slots__ = ("buffer", "layout")

    def __init__(self, layout: Layout, buffer: Any = None) -> None:
        if buffer is None:
            data = np.zeros(layout.nbytes, dtype=np.uint8)
        else:
            data = (
                np.frombuffer(buffer, dtype=np.uint8)
                if not isinstance(buffer, np.ndarray)
                else buffer.reshape(-1).view(np.uint8)
            )
            if data.nbytes != layout.nbytes:
                raise LayoutError(
                    f"buffer holds {data.nbytes} bytes but the layout needs {layout.nbytes}"
                )
        self.layout = layout
        self.buffer: npt.NDArray[np.uint8] = data

    # construction -----------------------------------------------------------------
    @classmethod
    def zeros(cls, layout: Layout) -> Params:
        return cls(layout)

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, npt.ArrayLike]) -> Params:
        """Pack named arrays (in mapping order) into one new buffer."""
        arrs = {k: np.asarray(v) for k, v in arrays.items()}
        layout = Layout.of((k, dtype_name(a.dtype), a.shape) for k, a in arrs.items())
        out = cls(layout)
        for spec in layout.tensors:
            out[spec.name][...] = arrs[spec.name]
        return out

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any]) -> Params:
        """Pack a torch ``state_dict`` (any dtypes, including bfloat16) into one buffer."""
        import torch

        entries = []
        tensors = {}
        for name, t in state_dict.items():
            t = t.detach().cpu()
            if t.dtype == torch.bfloat16:
                entries.append((name, "BF16", tuple(t.shape)))
                tensors[name] = t.contiguous().view(torch.int16).numpy().view(np.uint16)
            else:
                arr = t.contiguous().numpy()
                entries.append((name, dtype_name(arr.dtype), tuple(t.shape)))
                tensors[name] = arr
        out = cls(Layout.of(entries))
        for name, arr in tensors.items():
            out[name][...] = arr
        return out

    # views ----------------------------------------------------------------------
    def __getitem__(self, name: str) -> npt.NDArray[Any]:
        return self._view(self.layout.spec(name))

    def _view(self, spec: TensorSpec) -> npt.NDArray[Any]:
        raw = self.buffer[spec.offset : spec.end]
        return raw.view(DTYPES[spec.dtype]).reshape(spec.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.layout.names)

    def __len__(self) -> int:
        return len(self.layout.tensors)

    def arrays(self) -> dict[str, npt.NDArray[Any]]:
        """Every tensor as a view into the buffer (no copies)."""
        return {t.name: self._view(t) for t in self.layout.tensors}

    def flat(self, dtype: str | None = None) -> npt.NDArray[Any]:
        """The whole buffer as one 1-D array of the layout's single dtype (a view)."""
        kind = dtype or self.layout.dtype()
        if kind is None:
            raise LayoutError("flat() needs a layout with one dtype; this one is mixed")
        return self.buffer.view(DTYPES[kind])

    def to_state_dict(self, copy: bool = True) -> dict[str, Any]:
        """Torch tensors for ``load_state_dict``; ``copy=False`` shares this buffer."""
        import torch

        out: dict[str, Any] = {}
        for spec in self.layout.tensors:
            arr = self._view(spec)
            if copy or not arr.flags.writeable:
                arr = arr.copy()
            if spec.dtype == "BF16":
                out[spec.name] = torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
            else:
                out[spec.name] = torch.from_numpy(arr)
        return out

    def copy(self) -> Params:
        return Params(self.layout, self.buffer.copy())

    def bitwise_equal(self, other: Params) -> bool:
        return self.layout == other.layout and bool(np.array_equal(self.buffer, other.buffer))

    def __repr__(self) -> str:
        return (
            f"Params({len(self)} tensors, {self.layout.numel} values, {self.layout.nbytes} bytes)"
        )
