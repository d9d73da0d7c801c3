"""ComfyUI-EPD core: EPD-Solver / EPD-Plugin samplers, parameter tables, schedules and trainers.
Pure torch + numpy + safetensors + einops; never imports ComfyUI. The names below load on first use, so a
torch-free module (the importer's child, epd_core/tables/import_child.py) starts without torch."""
__all__ = ["EPDParams", "EPDParamsError", "EPDSamplingError", "sample_epd", "sample_epd_plugin"]
__version__ = "0.1.0"
_HOME = {"EPDParams": "tables.params", "EPDParamsError": "tables.params", "EPDSamplingError": "sampling.epd",
         "sample_epd": "sampling.paper", "sample_epd_plugin": "sampling.paper"}


def __getattr__(name):
    if name not in _HOME:
        raise AttributeError(f"module 'epd_core' has no attribute '{name}'")
    import importlib
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
