import os
import warnings

# Triton kernels are tested on CPU through the interpreter; Triton reads this when the kernels are
# decorated, i.e. at import, so it must be set before anything imports tome_plus.
if not os.environ.get("TOME_PLUS_TEST_CUDA"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import itertools

import pytest
import timm
import torch

# under pytest-xdist (`-n 2`) every worker gets one thread: the workers already fill the cores
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


# Parameter products of the interpreted-kernel tests: on CPU, a set of cases that holds every pair of
# values of any two parameters (all-pairs testing); the whole product with TOME_PLUS_TEST_FULL=1.
FULL_PRODUCTS = bool(os.environ.get("TOME_PLUS_TEST_FULL"))


def all_pairs(*axes, full: bool = FULL_PRODUCTS) -> list:
    """Cases from the product of `axes` that cover every pair of values of any two axes, chosen
    greedily from the product in its order (deterministic); the whole product when `full`."""
    product = list(itertools.product(*(range(len(axis)) for axis in axes)))
    if not full and len(axes) > 2:
        def pairs(case):
            return {(i, case[i], j, case[j]) for i, j in itertools.combinations(range(len(axes)), 2)}
        left, chosen = set().union(*map(pairs, product)), []
        while left:
            best = max(product, key=lambda case: len(pairs(case) & left))
            chosen.append(best)
            left -= pairs(best)
        product = sorted(chosen)
    return [tuple(axis[i] for axis, i in zip(axes, case)) for case in product]


# one model per kind of protected prefix: class token, class + distillation, class + 4 registers
PREFIX_MODELS = [("vit_small_patch16_224", {}), ("deit_small_distilled_patch16_224", {}),
                 ("vit_small_patch14_reg4_dinov2", {"img_size": 224})]


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
