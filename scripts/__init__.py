"""Scripts that make what the repository ships (the demo model, EPD-MS / DyWeight tables, workflows, thumbnails)
and run the demo. Run each as a file from the repository root, e.g. `.venv/bin/python scripts/make_ms_tables.py
--model demo`; a package only so that a script or a benchmark imports another script's helpers as
`from scripts.make_ms_tables import nfe_list` (with the repository root, and nothing else, on sys.path).
"""
