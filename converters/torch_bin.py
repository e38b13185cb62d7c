"""PyTorch .bin / .pt state dicts, read through torch.load(weights_only=True) (torch optional).

Only tensors come back (as numpy; bfloat16 via ml_dtypes); weights_only=True refuses pickled code.
"""

from __future__ import annotations

import os
from typing import Dict

import ml_dtypes
import numpy as np

from converters.errors import CheckpointError, CheckpointFileNotFound


def _to_numpy(t, path: str, key: str) -> np.ndarray:
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    try:
        return t.numpy()
    except TypeError as e:
        raise CheckpointError(f"{path}: key {key!r}: unsupported tensor dtype {t.dtype} ({e})") from None


def load_torch_state_dict(path: str) -> Dict[str, np.ndarray]:
    """{name: numpy array} from a torch checkpoint file; raises CheckpointError on anything else."""
    if not os.path.isfile(path):
        raise CheckpointFileNotFound(f"{path}: PyTorch checkpoint file not found")
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading PyTorch .bin/.pt checkpoints needs torch "
                              "(pip install torch), or convert the checkpoint to safetensors") from None
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            # legacy (non-zip) serialisation cannot be memory-mapped
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated zip, refused globals
        raise CheckpointError(f"{path}: cannot read PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(sd).__name__}")
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: key {k!r}: not a tensor ({type(v).__name__})")
        out[k] = _to_numpy(v, path, k)
    return out
