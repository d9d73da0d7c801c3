"""Public name: `epd_core.params.EPDParams` (the table format, epd_core/tables/params.py)."""
from epd_core.tables.params import EPDParams, EPDParamsError

__all__ = ["EPDParams", "EPDParamsError"]
