"""Training metrics: one JSON object per line in `metrics.jsonl`, and TensorBoard scalars when the
`tensorboard` package is installed. Written by the one rank that holds the reported loss."""

from __future__ import annotations

import json
import os
import sys
from typing import Dict, Optional

# Dense bf16 peak of one accelerator, for MFU. Model FLOPs are exact (models/flops.py).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops() -> Optional[float]:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


class MetricsWriter:
    def __init__(self, log_dir: Optional[str], enabled: bool):
        self.jsonl = None
        self.tb = None
        if not (enabled and log_dir):
            return
        os.makedirs(log_dir, exist_ok=True)
        self.jsonl = open(os.path.join(log_dir, "metrics.jsonl"), "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir)
        except ImportError:
            print(f"[metrics] tensorboard is not installed: writing {log_dir}/metrics.jsonl only", file=sys.stderr)

    def write(self, step: int, values: Dict[str, float]) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"iteration": step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
