"""Shared test setup: single-threaded torch (tiny tensors, reproducible timings) and no network."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)

# torch.testing imports lazily on its first call (about 1 s): pay that once here, not inside a test.
torch.testing.assert_close(torch.zeros(1), torch.zeros(1))


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default="cpu",
        help="torch device for the tests that take one (the `device` fixture), e.g. cuda (make gpu-check)",
    )


import pytest  # noqa: E402


@pytest.fixture
def device(request) -> torch.device:
    """The device given with ``--device`` (cpu by default); tests that take it run there."""
    dev = torch.device(request.config.getoption("--device"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda given but no CUDA device is available")
    return dev
