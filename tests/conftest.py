import os
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
NIST_REAL = SHARED / "data" / "nist_phantom_ir"


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
