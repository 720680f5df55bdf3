"""Simulation: many virtual clients on this machine (sequential, process) or on Ray."""

from pollinate.simulation.engine import BACKENDS, SimulationExecutor, make_backend, simulate

__all__ = ["BACKENDS", "SimulationExecutor", "make_backend", "simulate"]
