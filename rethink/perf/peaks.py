"""Hardware peaks that utilization (MFU) is measured against: vendors' dense data-sheet figures for GPUs, a
rough estimate for CPUs that says how it was made."""

from __future__ import annotations

from pathlib import Path

import torch

from rethink.training.options import cpu_name

__all__ = ["GPU_PEAKS", "cpu_name", "cpu_peak", "device_peak"]

# Dense data-sheet peaks in TFLOP/s: (name fragment, label, bf16 tensor cores, TF32 tensor cores, fp32 without
# tensor cores). First match wins, so the more specific names come first.
GPU_PEAKS = (
    ("H200", "NVIDIA H200", 989.0, 494.7, 66.9),
    ("H100 PCIe", "NVIDIA H100 PCIe", 756.0, 378.0, 51.2),
    ("H100 NVL", "NVIDIA H100 NVL", 835.0, 417.5, 60.0),
    ("H100", "NVIDIA H100 SXM", 989.0, 494.7, 66.9),
    ("A100", "NVIDIA A100", 312.0, 156.0, 19.5),
    ("L40S", "NVIDIA L40S", 362.0, 183.0, 91.6),
    ("L4", "NVIDIA L4", 121.0, 60.0, 30.3),
)


def device_peak(device: torch.device, amp: bool) -> tuple[float | None, str]:
    """(peak TFLOP/s or None, which figure that is) for the precision the run computes in: bf16 with autocast,
    else TF32 on CUDA (training allows TF32 matrix units, training/options.py), fp32 on the CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, label, bf16, tf32, _fp32 in GPU_PEAKS:
            if fragment in name:
                if amp:
                    return bf16, f"{label} bf16 dense (data sheet)"
                return tf32, f"{label} TF32 tensor-core dense (data sheet; float32 runs allow TF32)"
        return None, f"unknown ({name} is not in perf.peaks.GPU_PEAKS)"
    return cpu_peak()


def cpu_peak() -> tuple[float | None, str]:
    """A rough fp32 peak: threads x clock x FLOP per cycle (two FMA units of the widest vectors)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, "unknown (no /proc/cpuinfo)"
    mhz = [float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")]
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "").split()
    per_cycle = 64 if "avx512f" in flags else 32 if "fma" in flags else 8
    if not mhz:
        return None, "unknown (no clock in /proc/cpuinfo)"
    threads = torch.get_num_threads()
    peak = threads * max(mhz) / 1e3 * per_cycle / 1e3
    return peak, (f"rough CPU fp32 estimate: {threads} threads x {max(mhz) / 1e3:.2f} GHz x {per_cycle} FLOP/cycle")
