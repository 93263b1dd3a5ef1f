"""The packed nodes' CPU kernels (`pair_kernels.c`), built once per machine with the C compiler and loaded by ctypes.

`TreeSoftmaxHead`'s packed nodes score (node, row) pairs whose node weights are gathered per
pair (`tree_search.heads.gathered`). On CPU, float32, these three C loops (OpenMP over pairs,
rows or nodes) replace the compiled gather and the backward's two `embedding_bag` calls: a
packed tree's training step takes 1.1-1.6x less time (docs/cost-in-time.md, "The packed nodes'
C kernels"). They give the same numbers up to float32 summation order.

The shared library is built with ``$CC`` (default ``cc``) and ``-O3 -march=native -fopenmp``
into the cache (``<cache>/native/``), named by a hash of the source, the compiler's version,
the flags and this CPU's model and instruction sets, so a changed source or another machine
never loads a stale build. Without a compiler, or when the build fails, it warns once and the
head uses torch (the same results). ``TREE_SEARCH_NATIVE=0`` turns the kernels off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from tree_search.data.cache import cache_root

__all__ = [
    "NATIVE_ENV",
    "SOURCE",
    "available",
    "kernels_in_use",
    "pair_grad_nodes",
    "pair_grad_rows",
    "pair_scores",
    "usable",
]

NATIVE_ENV = "TREE_SEARCH_NATIVE"  # "auto" (default): the C kernels on CPU for float32; "0": never
SOURCE = Path(__file__).with_name("pair_kernels.c")  # the kernels' C source, shipped with the package
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c99")
_state: dict[str, object] = {}  # "library": the loaded CDLL, or "failed": why it could not be built


def _cpu_identity() -> str:
    """This CPU's model and instruction sets (``-march=native`` compiles for them)."""
    lines = []
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    lines.append(line.strip())
                if line.strip() == "":
                    break  # the first processor describes them all
    except OSError:
        pass
    return "\n".join(lines) or f"{platform.machine()} {platform.processor()}"


def _compiler_version(cc: str) -> str:
    result = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60, check=True)
    return result.stdout


def _build_key(cc: str, source: bytes) -> str:
    """A hash of what the build depends on: the source, the compiler's version, the flags and this CPU."""
    parts = [source, _compiler_version(cc).encode(), " ".join(_FLAGS).encode(), _cpu_identity().encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def _build() -> ctypes.CDLL:
    """Load the kernels from the cache, building them first when this source, compiler and CPU have no build."""
    cc = os.environ.get("CC", "cc")
    folder = cache_root() / "native"
    target = folder / f"pair_kernels-{_build_key(cc, SOURCE.read_bytes())}.so"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=folder, suffix=".so.partial")
        os.close(fd)
        try:
            result = subprocess.run([cc, *_FLAGS, str(SOURCE), "-o", partial], capture_output=True, text=True,
                                    timeout=300)  # fmt: skip
            if result.returncode != 0:
                raise OSError(f"{cc} exited with {result.returncode}: {result.stderr.strip()[-500:]}")
            os.replace(partial, target)  # atomic: a concurrent process loads either no file or a whole one
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    try:
        library = ctypes.CDLL(str(target))
    except OSError:  # a build that no longer loads (a changed system library): build it again, once
        target.unlink(missing_ok=True)
        return _build()
    pointer, size, threads = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    library.pair_scores.argtypes = [pointer] * 5 + [size] * 3 + [threads]
    library.pair_grad_rows.argtypes = [pointer] * 5 + [size] * 3 + [threads]
    library.pair_grad_nodes.argtypes = [pointer] * 8 + [size] * 4 + [threads]
    for function in (library.pair_scores, library.pair_grad_rows, library.pair_grad_nodes):
        function.restype = None
    return library


def _library() -> ctypes.CDLL | None:
    if "library" not in _state and "failed" not in _state:
        try:
            _state["library"] = _build()
        except (OSError, AttributeError, RecursionError, subprocess.SubprocessError) as err:
            _state["failed"] = f"{type(err).__name__}: {err}"
            warnings.warn(f"tree_search: building the packed nodes' C kernels failed ({_state['failed']}); using "
                          f"torch (the same results, slower on CPU; {NATIVE_ENV}=0 silences this)", RuntimeWarning,
                          stacklevel=3)  # fmt: skip
    return _state.get("library")  # type: ignore[return-value]


def available() -> bool:
    """Whether the kernels are on (`NATIVE_ENV`) and built (building them at the first call)."""
    return os.environ.get(NATIVE_ENV, "auto") != "0" and _library() is not None


def kernels_in_use(device_type: str) -> str:
    """The packed nodes' kernels a head on ``device_type`` runs: "native" (these, on CPU) or "torch"."""
    return "native" if device_type == "cpu" and available() else "torch"


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can take these tensors (CPU, float32 or int64) and are `available`."""
    return all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.int64) for t in tensors) and available()


def _address(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _checked_index(index: torch.Tensor, size: int, what: str) -> torch.Tensor:
    """``index`` as contiguous int64, every entry within ``0 .. size - 1`` (C reads no bounds)."""
    index = index.to(torch.int64).contiguous()
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size):
        raise IndexError(f"{what} out of range 0..{size - 1}: {int(index.min())}..{int(index.max())}")
    return index


def _check_shapes(weight: torch.Tensor, d: int, width: int, pairs: int, *others: torch.Tensor) -> None:
    """The sizes C trusts: ``weight`` (M, width * d), one entry per pair in each of ``others``."""
    if weight.dim() != 2 or weight.shape[1] != width * d:
        raise ValueError(f"weight must be (nodes, width x d) = (M, {width * d}), got {tuple(weight.shape)}")
    if any(t.shape[0] != pairs for t in others):
        raise ValueError(f"each per-pair tensor must hold {pairs} entries, got {[t.shape[0] for t in others]}")


def pair_scores(weight: torch.Tensor, h: torch.Tensor, nodes: torch.Tensor, rows: torch.Tensor,
                width: int) -> torch.Tensor:  # fmt: skip
    """(P, width) ``weight[nodes[p]].view(width, d) @ h[rows[p]]``: float32 CPU tensors, no autograd."""
    library, d = _library(), h.shape[1]
    _check_shapes(weight, d, width, nodes.shape[0], rows)
    weight, h = weight.contiguous(), h.contiguous()
    nodes = _checked_index(nodes, weight.shape[0], "nodes")
    rows = _checked_index(rows, h.shape[0], "rows")
    out = torch.empty(nodes.shape[0], width, dtype=torch.float32)
    library.pair_scores(_address(weight), _address(h), _address(nodes), _address(rows), _address(out),
                        nodes.shape[0], width, d, torch.get_num_threads())  # fmt: skip
    return out


def pair_grad_rows(weight: torch.Tensor, grad: torch.Tensor, nodes: torch.Tensor, sorted_rows: torch.Tensor,
                   num_rows: int) -> torch.Tensor:  # fmt: skip
    """(num_rows, d): row r's sum over its pairs of ``grad[p] @ weight[nodes[p]].view(width, d)`` (rows sorted)."""
    library, width = _library(), grad.shape[1]
    d = weight.shape[1] // width
    _check_shapes(weight, d, width, grad.shape[0], nodes, sorted_rows)
    weight, grad = weight.contiguous(), grad.contiguous()
    nodes = _checked_index(nodes, weight.shape[0], "nodes")
    start = torch.searchsorted(sorted_rows, torch.arange(num_rows + 1, dtype=sorted_rows.dtype)).to(torch.int64)
    out = torch.empty(num_rows, d, dtype=torch.float32)
    library.pair_grad_rows(_address(weight), _address(grad), _address(nodes), _address(start), _address(out),
                           num_rows, width, d, torch.get_num_threads())  # fmt: skip
    return out


def pair_grad_nodes(h: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor, nodes: torch.Tensor,
                    num_nodes: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(unique, values)``: the nodes with pairs (sorted), and (U, width * d) sums of ``grad[p] x h[rows[p]]``."""
    library, width = _library(), grad.shape[1]
    d = h.shape[1]
    if rows.shape[0] != grad.shape[0] or nodes.shape[0] != grad.shape[0]:
        raise ValueError(f"rows, nodes and grad must hold one entry per pair, got {rows.shape[0]}, "
                         f"{nodes.shape[0]} and {grad.shape[0]}")  # fmt: skip
    h, grad = h.contiguous(), grad.contiguous()
    rows = _checked_index(rows, h.shape[0], "rows")
    nodes = _checked_index(nodes, num_nodes, "nodes")
    counts = torch.bincount(nodes, minlength=num_nodes)
    unique = torch.nonzero(counts, as_tuple=True)[0]
    slot = torch.full((num_nodes,), -1, dtype=torch.int64).index_copy_(0, unique, torch.arange(unique.shape[0]))
    start = torch.cat([counts.new_zeros(1), torch.cumsum(counts[unique], 0)])
    scratch = torch.empty(nodes.shape[0] + unique.shape[0], dtype=torch.int64)
    out = torch.empty(unique.shape[0], width * d, dtype=torch.float32)
    library.pair_grad_nodes(_address(h), _address(grad), _address(rows), _address(nodes), _address(slot),
                            _address(start), _address(scratch), _address(out), nodes.shape[0], unique.shape[0], width,
                            d, torch.get_num_threads())  # fmt: skip
    return unique, out
