"""Public name: `epd_core.solver.sample_epd / sample_epd_plugin` (the paper's samplers, epd_core/sampling/paper.py)."""
from epd_core.sampling.epd import EPDSamplingError
from epd_core.sampling.paper import sample_epd, sample_epd_plugin
from epd_core.sampling.plan import sampler_sigmas

__all__ = ["EPDSamplingError", "sample_epd", "sample_epd_plugin", "sampler_sigmas"]
