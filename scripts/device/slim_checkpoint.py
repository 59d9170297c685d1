"""Copy a training checkpoint without its optimizer states (q3: 3.1 MB instead of 8.5), for the few
files a device call may return: ``python3 scripts/device/slim_checkpoint.py SRC DST``.
Training resumes from such a checkpoint with fresh optimizers (``tileserver.train``)."""

import sys

import torch

ck = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
torch.save({k: v for k, v in ck.items() if k not in ("opt", "aux_opt")}, sys.argv[2])
