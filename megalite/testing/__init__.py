"""Distributed test harness: run functions on pools of gloo ranks on CPU."""
from megalite.testing.pool import DistributedTestError, RankPool, get_pool, run_distributed

__all__ = ["DistributedTestError", "RankPool", "get_pool", "run_distributed"]
