"""Memory and time of fine-tuning a model with a method on this hardware, from first principles
plus two constants calibrated on tunesmith's own measured runs (see README, "Choosing a model").

Memory (MB) = overhead + weights + trained state + activations, where
- weights: 4 bytes x P in fp32; 2 bytes x P where training runs under bf16 and the method keeps its
  frozen weights in bf16 (train/precision.py; not full fine-tuning, whose weights all train);
  QLoRA: 0.56 bytes x P (4-bit NF4 plus block scales); DoRA: 8.4 bytes x P, its fp32 weights plus 4.4
  bytes a weight its measured peaks hold (fitted with its activation factor on quickstart runs at batch
  4, 8 and 32, not profiled);
- trained state: 16 bytes per trained parameter (fp32 weight, gradient, two Adam moments): all P
  for full fine-tuning; ~1% of P for LoRA/DoRA (rank 8 on the attention and MLP projections);
  nothing worth counting for IA3 and soft prompts;
- activations: ACTIVATION_BYTES x layers x batch x tokens per row x hidden (Korthikanti et al.'s
  34 bytes per element per layer for 16-bit activations), times the method's activation_factor (DoRA 1.95,
  fitted on measured peaks, the causes not profiled);
- overhead: the Python process with torch, transformers and tokenizers loaded (OVERHEAD_MB).
Time (s) = tokens x FLOPs per token / (peak FLOP/s x EFFICIENCY), with peak FLOP/s measured on this
machine by a short matmul probe. The FLOPs per token are effective ones (registry.METHOD_SPECS):
LoRA's 4P (forward 2P, backward 2P: no weight gradients) is the anchor EFFICIENCY is fitted on; every
other method's factor is 4 x LoRA's tokens/s over its own, measured on the same machine the same
day, so it carries whatever the FLOP count misses (measured, causes not profiled: full fine-tuning
7.7P where its FLOPs are 6P, DoRA 10.3P, IA3 3.7P, soft prompts 3.5P).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import torch

from tunesmith import hardware
from tunesmith.registry import METHOD_SPECS

# calibrated: quickstart LoRA training, 1,694.6 MiB peak RSS (2026-12-05, bf16 frozen weights; the
# 2026-11-28 calibration, 2,400 MB on a 3,402 MB peak, predates the host-memory work).
OVERHEAD_MB = 1000
ACTIVATION_BYTES = 34
# calibrated: quickstart LoRA in bf16 on a 2-core EPYC, 627 tokens/s (median of two runs, 0.414-0.419
# TFLOP/s probes, 2026-12-05); the third-round run, 585 tokens/s at 0.40, gives 0.79. The 0.6 of
# 2026-11-28 (479 tokens/s) predates the host-memory and step-speed work.
EFFICIENCY = 0.8


@dataclass
class Hardware:
    device: str
    name: str
    memory_mb: float
    peak_tflops: float
    bf16: bool

    def to_json(self) -> dict:
        return asdict(self)


def detect(probe_seconds: float = 0.5) -> Hardware:
    """This machine: device, memory available to training, and measured matmul peak (bf16 when native)."""
    dev = hardware.device()
    bf16 = hardware.bf16_supported(dev)
    name = torch.cuda.get_device_properties(0).name if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return Hardware(dev.type, name, round(device_memory_mb(dev)), round(matmul_tflops(dev, bf16, probe_seconds), 3),
                    bf16)


def device_memory_mb(dev: torch.device) -> float:
    """Memory training can use on `dev`, in MiB: the GPU's total memory, or the machine's RAM."""
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(0).total_memory / 2**20
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20


def matmul_tflops(dev: torch.device, bf16: bool, seconds: float = 0.5, n: int = 1024) -> float:
    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    a @ b  # warm-up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        done += 1
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * done / (time.perf_counter() - started) / 1e12


def estimate(params_m: float, layers: int, hidden: int, method: str, tokens: int, batch: int, row_tokens: int,
             hw: Hardware) -> dict:
    """{memory_mb, seconds, fits} of training `tokens` tokens (all epochs) with `method`."""
    spec = METHOD_SPECS[method]
    if spec.flops_per_token is None or spec.trained_share is None:
        raise ValueError(f"method '{method}' trains nothing: no training estimate")
    memory = memory_mb(params_m, layers, hidden, method, batch, row_tokens, hw.bf16)
    seconds = tokens * spec.flops_per_token * params_m * 1e6 / (hw.peak_tflops * 1e12 * EFFICIENCY)
    return {"method": method, "memory_mb": round(memory), "seconds": round(seconds, 1),
            "fits": fits(memory, hw.memory_mb)}


def memory_mb(params_m: float, layers: int, hidden: int, method: str, batch: int, row_tokens: int,
              bf16: bool = False, reference_copy: bool = False) -> float:
    """Estimated peak memory (MiB) of training with `method` on batches of `batch` rows of `row_tokens`
    (`bf16`: training runs under bf16 autocast; `reference_copy`: a frozen copy of the whole model sits
    beside it, as full fine-tuning DPO/KTO's reference, kept in bf16 under bf16 and fp32 otherwise)."""
    p = params_m * 1e6
    spec = METHOD_SPECS[method]
    half = bf16 and spec.low_precision_frozen and spec.weight_bytes == 4.0 and (spec.trained_share or 0) < 1
    weights = (2.0 if half else spec.weight_bytes) * p
    reference = (2.0 if bf16 else 4.0) * p if reference_copy else 0.0
    trained = 16 * (spec.trained_share or 0.0) * p
    activations = ACTIVATION_BYTES * spec.activation_factor * layers * batch * row_tokens * hidden
    return OVERHEAD_MB + (weights + reference + trained + activations) / 2**20


def fits(memory: float, device_memory: float) -> bool:
    """Whether an estimated `memory` fits `device_memory` (both MiB), leaving a tenth for fragmentation
    and whatever else the device holds."""
    return memory < 0.9 * device_memory
