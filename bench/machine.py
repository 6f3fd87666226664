"""What every benchmark records about the machine it ran on (imported by the bench scripts)."""

from __future__ import annotations

import os
import platform

import torch
import transformers


def machine_info(load_at_start: tuple[float, ...]) -> dict:
    """CPU, library versions, and the load averages (1, 5, 15 min) at start and end: other work on
    a small CPU skews every timing, so a result carries the evidence of how busy the machine was."""
    return {
        "cpu_count": os.cpu_count(),
        "load_average": {"start": load_at_start, "end": os.getloadavg()},
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor(),
    }
