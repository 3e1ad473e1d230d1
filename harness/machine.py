"""What a benchmark ran on and beside what load: recorded in every results file, so a figure is never read
without its machine."""

from __future__ import annotations

import importlib.metadata as md
import os
from typing import Any

import numpy as np
import torch

from mind.experiment import machine


def _version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def host() -> dict[str, Any]:
    """The model side's machine() plus the serving packages' versions and the load average at the start."""
    return {
        **machine(),  # platform, processor, python, torch
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "pymilvus": _version("pymilvus"),
        "milvus_lite": _version("milvus-lite"),
        "nvidia_pytriton": _version("nvidia-pytriton"),
        "tritonclient": _version("tritonclient"),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "note": "shared machine: compare figures only within this run (ratios)",
    }


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]
