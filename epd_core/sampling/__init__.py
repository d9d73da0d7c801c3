"""Sampling: the step and loop (epd.py), one module per solver variant (paper.py: EPD-Solver / EPD-Plugin,
multistep.py: EPD-MS, dyweight.py: DyWeight), the registry of variants (registry.py), which sigmas and rows a
table gets on a list (plan.py), the parallel points (points.py), schedules and the CFG guard."""
