"""Device selection for kernel tests: CUDA when present, else the Triton interpreter on CPU.

On a CPU-only machine tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton,
so the kernels run in the interpreter; GPU-only tests skip without CUDA.
"""
import importlib.util
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture
def device():
    """'cuda', or 'cpu' under the Triton interpreter."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if HAS_CUDA and not INTERPRET:
        return "cuda"
    if not INTERPRET:
        pytest.skip("no CUDA: run with TRITON_INTERPRET=1 to test the kernels in the Triton interpreter")
    return "cpu"


@pytest.fixture
def cuda():
    """For tests that need the compiled kernels on a GPU (real sizes, exactness at large K)."""
    if not (HAS_TRITON and HAS_CUDA) or INTERPRET:
        pytest.skip("needs a CUDA GPU (and TRITON_INTERPRET unset)")
    return "cuda"
