"""Replay captured traces under candidate policies: metrics, the oracle bound, batched evaluation."""

from kvsim.sim.simulate import ORACLE, Simulation, simulate

__all__ = ["ORACLE", "Simulation", "simulate"]
