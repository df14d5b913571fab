"""The devices the engine tests run on; they drive the engine with `bench.drive`."""

from __future__ import annotations

import pytest
import torch

# The engine's CUDA path runs where a GPU is (float32, against the same CPU references).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
