"""Shared test setup: single-threaded torch (tiny tensors, reproducible timings) and no network."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)

# torch.testing imports lazily on its first call (about 1 s): pay that once here, not inside a test.
torch.testing.assert_close(torch.zeros(1), torch.zeros(1))
