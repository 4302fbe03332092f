"""Shared fixtures: a world of one process for single-process reference runs."""
import pytest
import torch


@pytest.fixture(scope="session")
def world_of_one():
    """Initialise torch.distributed as a single gloo rank in the test process (reference runs)."""
    from megalite.distributed import init_distributed

    torch.set_num_threads(1)
    init_distributed("gloo")
    yield


@pytest.fixture
def solo_groups(world_of_one):
    """Model-parallel groups of size one in the test process; destroyed after the test."""
    from megalite import parallel_state

    groups = parallel_state.initialize_model_parallel()
    yield groups
    parallel_state.destroy_model_parallel(groups)
