"""GPU profiles: what `--gpu NAME` promises about the card, and how to tell whether it is really there.

A profile is matched against the device name that the engine worker reports (`describe()["gpu_name"]`),
because the driver may run on a machine without the GPU (a Ray head node, a laptop).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .errors import GpuMismatchError, StudyError


@dataclass(frozen=True)
class GpuProfile:
    name: str
    description: str
    memory_gib: float  # nominal device memory
    bandwidth_gbs: float  # nominal memory bandwidth, GB/s
    name_patterns: tuple[str, ...]  # regexes (case-insensitive) over the CUDA device name
    is_gpu: bool = True

    def matches(self, device_name: str) -> bool:
        return any(re.search(p, device_name, re.IGNORECASE) for p in self.name_patterns)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "memory_gib": self.memory_gib,
                "bandwidth_gbs": self.bandwidth_gbs}


# Patterns are anchored on the product names NVIDIA drivers report, e.g. "NVIDIA A10G",
# "NVIDIA L4", "NVIDIA L40S", "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3", "NVIDIA H200".
PROFILES: dict[str, GpuProfile] = {p.name: p for p in (
    GpuProfile("a10g", "NVIDIA A10G (AWS g5), 24 GB GDDR6", 24, 600, (r"\bA10G\b",)),
    GpuProfile("l4", "NVIDIA L4, 24 GB GDDR6", 24, 300, (r"\bL4\b(?!0)",)),
    GpuProfile("l40s", "NVIDIA L40S, 48 GB GDDR6", 48, 864, (r"\bL40S\b",)),
    GpuProfile("a100", "NVIDIA A100 (40 or 80 GB HBM2e)", 80, 2039, (r"\bA100\b",)),
    GpuProfile("h100", "NVIDIA H100 (80 GB HBM3)", 80, 3350, (r"\bH100\b",)),
    GpuProfile("h200", "NVIDIA H200 (141 GB HBM3e)", 141, 4800, (r"\bH200\b",)),
    GpuProfile("cpu", "CPU only (the demo; speed numbers are not GPU numbers)", 0, 0, (r"^cpu$",), is_gpu=False),
)}


def get_profile(name: str) -> GpuProfile:
    key = name.strip().lower()
    if key not in PROFILES:
        raise StudyError(f"--gpu {name}: unknown GPU profile (known: {', '.join(PROFILES)})")
    return PROFILES[key]


def identify(device_name: str) -> str | None:
    """The profile a reported device name belongs to, or None for an unknown card."""
    for profile in PROFILES.values():
        if profile.matches(device_name):
            return profile.name
    return None


def check_device(profile: GpuProfile, described: dict[str, Any], allow_mismatch: bool) -> str | None:
    """Compare what a worker really runs on with the profile. Returns a warning line when a mismatch
    is allowed, None when it matches; raises GpuMismatchError otherwise."""
    gpu_name = str(described.get("gpu_name") or described.get("device") or "unknown")
    if profile.matches(gpu_name):
        return None
    actual = identify(gpu_name)
    line = (f"--gpu {profile.name}: the worker runs on '{gpu_name}'"
            f" (profile {actual or 'unknown'}), not on {profile.description}")
    if allow_mismatch:
        return line + "; continuing because of --allow-gpu-mismatch (the recipe records the real device)"
    raise GpuMismatchError(line + "; pass --gpu " + (actual or "<profile>") + " or --allow-gpu-mismatch")


def format_profiles() -> str:
    rows = [f"  {p.name:<6} {p.memory_gib:>5.0f} GiB {p.bandwidth_gbs:>6.0f} GB/s  {p.description}"
            for p in PROFILES.values()]
    return "\n".join(rows)
