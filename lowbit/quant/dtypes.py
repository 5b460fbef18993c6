"""The names of the float dtypes lowbit trains and deploys in: one table for configs and the command line."""

import torch

# config ``dtype: bf16`` and ``--dtype bfloat16`` both name torch.bfloat16
DTYPE_NAMES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
