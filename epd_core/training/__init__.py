"""Training: distillation from a teacher solver (distill.py, distill_config.py, teachers.py), RDPO (rl/), the
trainer loop both share (loop.py) and the command line (cli.py, run as `python -m epd_core.train`)."""
