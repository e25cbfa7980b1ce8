import os
import warnings

import pytest
import timm
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def make(name: str, **kwargs):
    """A random-init timm model in eval mode, seeded so every test sees the same weights."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return timm.create_model(name, pretrained=False, **kwargs).eval()


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(2, 3, 224, 224)
