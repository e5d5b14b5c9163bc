"""Device, precision and resource figures, each computed in one place."""

from __future__ import annotations

import resource
import sys
from contextlib import nullcontext

import torch


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def bf16_supported(dev: torch.device) -> bool:
    """True where bf16 matmuls run natively (CUDA with bf16, or a CPU with AVX-512 BF16 / AMX)."""
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def int8_full_range() -> bool:
    """True where int8 matmul kernels accumulate in 32 bits (VNNI/AMX), so 8-bit activations cannot saturate."""
    return bool(_cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def _cpu_flags() -> set[str]:
    try:
        text = open("/proc/cpuinfo", encoding="ascii", errors="ignore").read()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def use_bf16(precision: str, dev: torch.device) -> bool:
    return precision == "bf16" or (precision == "auto" and bf16_supported(dev))


def autocast(enabled: bool, dev: torch.device):
    """bf16 autocast on `dev` when enabled; weights stay fp32 so optimiser maths is exact."""
    return torch.autocast(dev.type, dtype=torch.bfloat16) if enabled else nullcontext()


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB.

    Linux's VmHWM belongs to the process image, so a child started by fork + exec reports its own
    peak; ru_maxrss (the fallback elsewhere) carries the parent's size at fork across the exec.
    """
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024, 1)


def reset_peak_rss() -> None:
    """Start a new peak-memory window for this process (Linux: "5" to /proc/self/clear_refs resets
    VmHWM), so a stage run after another in one process reports its own peak."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass


def gpu_peak_mb() -> float | None:
    """Peak GPU memory torch allocated in this process since the last `reset_gpu_peak`, in MiB
    (torch.cuda.max_memory_allocated); None without a CUDA device: an unmeasured figure, which fails
    any objective constraint on it rather than passing."""
    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def reset_gpu_peak() -> None:
    """Start a new GPU peak-memory window (no-op without CUDA), like `reset_peak_rss` for host memory."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


# transformers' own switch: with it set, its SDPA attention passes grouped-query K/V to the kernel as is.
NATIVE_GQA_ENV = "TRANSFORMERS_SDPA_FORCE_GQA"
NATIVE_GQA_TORCH = (2, 9)  # the first torch whose CPU flash-attention kernel takes grouped K/V (see native_gqa)


def torch_at_least(version: tuple[int, int]) -> bool:
    """Whether the running torch is `version` (major, minor) or later ("2.13.0+cpu" counts as (2, 13))."""
    return tuple(int(p) for p in torch.__version__.split(".")[:2]) >= version


def native_gqa(dev: torch.device) -> bool:
    """On a CPU, let SDPA attend grouped-query K/V heads natively; True when that is in effect.

    transformers repeats each K/V head for its query heads (SmolLM2-135M: 3 heads to 9) unless the call
    has no mask, and SDPA keeps the repeated copies for backward: in training, two activations of the
    query's width per layer instead of a third of it (about 74 MB on a 1,600-token batch of that model).
    PyTorch's CPU flash-attention kernel takes grouped-query K/V with a mask in recent releases (tested
    on 2.13: same output); older ones accept `enable_gqa` (2.5+) but run it on the math kernel, which
    repeats K/V itself and keeps the whole attention matrix, so it is used from torch 2.9 only. On CUDA
    a masked GQA call also falls back to the math kernel: there it stays off. A value the user set is
    left alone."""
    import os

    if dev.type != "cpu" or not torch_at_least(NATIVE_GQA_TORCH):
        return os.environ.get(NATIVE_GQA_ENV) == "1"
    os.environ.setdefault(NATIVE_GQA_ENV, "1")
    return os.environ[NATIVE_GQA_ENV] == "1"


HEAP_MMAP_THRESHOLD = 256 * 1024  # bytes; see steady_heap


def steady_heap(threshold: int = HEAP_MMAP_THRESHOLD) -> bool:
    """glibc: give every allocation of `threshold` bytes or more pages of its own, returned to the
    system when freed; False where the C library has no mallopt (nothing changed).

    PyTorch's CPU tensors come straight from malloc. glibc raises its mmap threshold (up to 32 MiB)
    each time a large block is freed, so after the first steps activations and gradients are carved
    from the heap instead, in shapes that change batch to batch; the freed holes are rarely reused
    whole and the heap only grows (quickstart training: +1 GB over two epochs). A fixed threshold
    keeps those tensors out of the heap. Numerics are untouched: only where the bytes live."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    m_mmap_threshold = -3  # <malloc.h>; setting it also stops the dynamic adjustment
    return bool(libc.mallopt(m_mmap_threshold, int(threshold)))


def release_free_memory() -> None:
    """Hand the heap's free pages back to the system (glibc malloc_trim); a no-op elsewhere. Called
    between stages, so one stage's freed memory does not count in the next stage's resident size."""
    import gc

    gc.collect()  # PEFT/transformers models hold reference cycles: free them before trimming
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl): its allocator has neither call
        return None


def reset_peaks() -> None:
    """Start new peak windows for host memory (peak_rss_mb) and GPU memory (gpu_peak_mb)."""
    reset_peak_rss()
    reset_gpu_peak()


def throughput(tokens: int, seconds: float) -> float:
    """Tokens per second, the one definition used everywhere."""
    return round(tokens / seconds, 2) if seconds > 0 else 0.0


def examples_per_second(n: int, seconds: float) -> float | None:
    """Examples predicted per second, rounded to 2 decimals; None when no time was measured (the
    eval stage's `throughput_eps` and a variant's `throughput_per_s`)."""
    return round(n / seconds, 2) if seconds > 0 else None


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens of the batch's examples; a shared prefix counts once per row,
    as each example's sequence contains it (the figure does not depend on how it is computed)."""
    rows = batch["attention_mask"].shape[0]
    prefix = batch.get("prefix_ids")
    return int(batch["attention_mask"].sum()) + (rows * len(prefix) if prefix is not None else 0)


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
