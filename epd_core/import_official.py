"""Public command: `python -m epd_core.import_official IN.pkl OUT.safetensors` (epd_core/tables/import_official.py)."""
import sys

from epd_core.tables.import_official import EPDImportError, import_official, main

__all__ = ["EPDImportError", "import_official", "main"]

if __name__ == "__main__":
    sys.exit(main())
