"""ComfyUI-EPD core: EPD-Solver / EPD-Plugin samplers, parameter tables, schedules and trainers.
Pure torch + numpy + safetensors + einops; never imports ComfyUI."""
from .params import EPDParams, EPDParamsError
from .solver import EPDSamplingError, sample_epd, sample_epd_plugin

__all__ = ["EPDParams", "EPDParamsError", "EPDSamplingError", "sample_epd", "sample_epd_plugin"]
__version__ = "0.1.0"
