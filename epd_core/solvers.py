"""Public name: `epd_core.solvers.variant(name)` (the registry of solver variants, epd_core/sampling/registry.py)."""
from epd_core.sampling.registry import NAMES, SOLVERS, SolverVariant, variant

__all__ = ["NAMES", "SOLVERS", "SolverVariant", "variant"]
