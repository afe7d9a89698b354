import pytest
import torch


@pytest.fixture(autouse=True)
def full_precision_convolutions():
    """On a GPU, the torch reference's conv2d must not use TF32 (10-bit mantissa) when compared at 1e-5."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
