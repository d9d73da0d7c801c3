"""The names users' scripts and outside checks call keep working after epd_core grew folders: the public modules
re-export the same objects, and both command lines run as `python -m`."""
import subprocess
import sys
from pathlib import Path

import epd_core
from epd_core.params import EPDParams
from epd_core.solver import sample_epd, sample_epd_plugin
from epd_core.solvers import variant
from epd_core.sampling import paper, registry
from epd_core.tables import params

REPO = Path(__file__).resolve().parents[1]


def test_the_public_names_are_the_modules_objects():
    assert EPDParams is params.EPDParams is epd_core.EPDParams
    assert sample_epd is paper.sample_epd is epd_core.sample_epd
    assert sample_epd_plugin is paper.sample_epd_plugin
    assert variant is registry.variant
    assert variant("epd").sample_fn() is sample_epd
    table = EPDParams.from_values([[0.5]], [[1.0]])
    assert table.num_steps == 1 and table.num_points == 1


def test_both_command_lines_run_as_python_dash_m():
    for module in ("epd_core.train", "epd_core.import_official"):
        proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert f"python -m {module}" in proc.stdout
