"""Seeded randomness: one generator per (seed, step, stream) or per sample.

Every random draw of a training step comes from :func:`step_generator` / :func:`step_rng`, so a
resumed run reaches exactly the weights of an uninterrupted one. Under ``accelerate launch`` every
process draws the *global* batch of the step from the same generators and trains on its slice
(:func:`process_rows`), so P processes of batch b see the batch one process of batch P x b sees.
Every synthetic tile k starts from :func:`sample_generator` ``(seed, k)``, so tile k is the same
whatever the batch size or number of processes.
"""

from __future__ import annotations

import numpy as np
import torch


def step_generator(seed: int, step: int, rank: int = 0, device: torch.device | str = "cpu",
                   stream: int = 0) -> torch.Generator:
    """A torch generator for one (seed, step, process, stream): resumable and batch-order free."""
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence([seed, step, rank, stream]).generate_state(1)[0]))
    return g


def step_rng(seed: int, step: int, rank: int = 0, stream: int = 0) -> np.random.Generator:
    """A numpy generator for one (seed, step, process, stream)."""
    return np.random.default_rng([seed, step, rank, stream])


def sample_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Generator of sample ``index``: tile k is the same whatever the batch size or process count."""
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence([seed, 1_000_003, index]).generate_state(1)[0]))
    return g


def process_rows(batch_size: int, rank: int) -> slice:
    """Process ``rank``'s rows of a global batch drawn for all processes: ``[rank*b, (rank+1)*b)``."""
    return slice(rank * batch_size, (rank + 1) * batch_size)
