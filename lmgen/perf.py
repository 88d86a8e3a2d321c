"""How fast a run goes: peak FLOP/s per device, a measured matmul ceiling, and timing helpers.

``lm/mfu`` (model FLOPs utilisation, PaLM appendix B) divides the training FLOP/s that a run
achieves (``Llama.flops_per_token`` × tokens/s) by the device's peak. On a GPU the peak comes
from ``PEAK_FLOPS`` (vendor datasheets, dense 16-bit tensor-core rates, no sparsity), matched
by name; a CPU has no such table, so its peak is *measured*: a large dense matmul in the
training dtype, in this process (``matmul_ceiling``) — the practical ceiling the benchmarks
compare against too. ``train.peak_flops`` overrides both.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# Dense bf16/fp16 tensor-core FLOP/s per GPU (NVIDIA datasheets, without 2:4 sparsity). Keys are
# matched as substrings of torch.cuda.get_device_name(), most specific first.
PEAK_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "V100": 125e12,
}

_CEILINGS: dict[tuple[str, torch.dtype, int], float] = {}

# Lightning precisions a run may ask for (``train.precision``, ``stage1.precision``); ``auto``
# is decided by ``resolve_precision``.
PRECISIONS = ("auto", "32", "32-true", "bf16-mixed", "16-mixed", "bf16-true")


@dataclass(frozen=True)
class Peak:
    """Peak FLOP/s of one device and where the number came from (``table:H100``, ``measured``, ``config``)."""

    flops: float
    source: str


def resolve_precision(precision: str, accelerator: str) -> str:
    """The Lightning precision a run trains in: ``precision`` itself, or for ``auto`` bf16-mixed on
    a CUDA GPU that has bf16 (16-mixed on one that has not) and 32-true on every CPU.

    Precision changes results, so a default that followed the CPU model would make one config
    give different numbers on different machines; and at the sizes a CPU trains here it buys
    nothing: on an AVX512-BF16 CPU without AMX a 2048³ bf16 matmul runs 2.3× faster than fp32
    but a nano or micro Llama step under bf16 autocast runs no faster (``python
    benchmarks/precision.py``), and on another such CPU bf16 matmuls were slower than fp32.
    A CPU with AMX, or a larger model, can ask for ``bf16-mixed``; every run logs the precision
    it used (param ``resolved.precision``).
    """
    if precision != "auto":
        return precision
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def precision_dtype(precision: str) -> torch.dtype:
    """The matmul dtype of a Lightning precision string (``bf16-mixed`` → bfloat16, ``32-true`` → float32)."""
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


def device_peak(device: torch.device, dtype: torch.dtype, configured: float = 0.0) -> Peak:
    """Peak FLOP/s of ``device`` for matmuls in ``dtype``: ``configured`` if > 0, else the
    ``PEAK_FLOPS`` entry of a known GPU, else the measured ``matmul_ceiling``."""
    if configured > 0:
        return Peak(configured, "config")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in PEAK_FLOPS.items():
            if key in name:
                return Peak(flops, f"table:{key}")
        log.info("no PEAK_FLOPS entry for %r: lm/mfu is against a measured matmul ceiling", name)
    return Peak(matmul_ceiling(device, dtype), "measured")


def ceiling_size(device: torch.device) -> int:
    """Side of the square matmul ``matmul_ceiling`` times: 8192 on a GPU, where a 2048³ product
    (tens of µs on an H100/H200) measures the launch more than the tensor cores, 2048 on a CPU,
    where 8192³ would take seconds per product."""
    return 8192 if device.type == "cuda" else 2048


def matmul_ceiling(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 3) -> float:
    """Dense matmul FLOP/s of (size × size) @ (size × size) in ``dtype`` on ``device`` (size:
    ``ceiling_size``), median of ``repeats`` after a warm-up, with the process's current thread
    count. Cached per process."""
    size = size or ceiling_size(device)
    key = (str(device), dtype, size)
    if key not in _CEILINGS:
        # A private generator: measuring must not move the global RNG (a run's label dropout
        # would then depend on whether the ceiling was already cached in this process).
        g = torch.Generator().manual_seed(0)
        a, b = (torch.randn(size, size, generator=g).to(device=device, dtype=dtype) for _ in range(2))
        seconds = interleaved({"matmul": lambda: a @ b}, device, repeats=repeats)["matmul"]
        _CEILINGS[key] = 2.0 * size**3 / seconds
    return _CEILINGS[key]


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (CUDA is asynchronous; a CPU needs nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(arms: dict[str, Callable[[], object]], device: torch.device, repeats: int = 5,
                inner: int = 1) -> dict[str, float]:
    """Median seconds per call of every arm, timed in turns (arm 1, arm 2, …, arm 1, …) so that
    a shared machine's slow moments hit every arm alike. Each arm is warmed up once first."""
    for fn in arms.values():
        fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(repeats):
        for name, fn in arms.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            synchronize(device)
            times[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(t) for name, t in times.items()}


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """A GitHub markdown table (benchmarks print these)."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
