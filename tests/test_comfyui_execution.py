"""scripts/comfyui_execution_tests.sh, the step of scripts/test.sh that runs ComfyUI's own tests/execution with the
pack installed in custom_nodes/ (the whole suite runs there, after these tests). Here: a subset passes and proves
the pack was imported, and a pack that fails to import fails the run instead of passing unnoticed."""
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "comfyui_execution_tests.sh"
pytestmark = [pytest.mark.server, pytest.mark.slow]


def run(tmp_path, *pytest_args, pack=None):
    env = {**os.environ, "EPD_EXECUTION_WORK": str(tmp_path / "work")}
    if pack is not None:
        env["EPD_PACK_DIR"] = str(pack)
    out = subprocess.run(["bash", str(SCRIPT), *pytest_args], env=env, capture_output=True, text=True, timeout=600)
    return out.returncode, out.stdout + out.stderr


def test_test_sh_runs_the_execution_suite_for_the_whole_suite():
    text = (REPO / "scripts" / "test.sh").read_text()
    assert 'bash "$ROOT/scripts/comfyui_execution_tests.sh"' in text


def test_a_subset_passes_with_the_pack_imported(tmp_path):
    code, log = run(tmp_path, "-k", "TestPublicAPI")
    assert code == 0, log[-4000:]
    assert "3 passed" in log and "the pack was imported by all 1 server starts" in log, log[-4000:]
    link = tmp_path / "work" / "ComfyUI" / "custom_nodes" / "ComfyUI-EPD"
    assert link.resolve() == REPO  # installed as a custom node of the copy; the ComfyUI tree itself is untouched
    # the random test checkpoints cached in the tree (GiB each, sparse on disk) stay out of the copy
    assert not (tmp_path / "work" / "ComfyUI" / "epd-test-models").exists()


def test_a_pack_that_fails_to_import_fails_the_run(tmp_path):
    broken = tmp_path / "broken_pack"
    broken.mkdir()
    (broken / "__init__.py").write_text('raise ImportError("broken on purpose")\n')
    code, log = run(tmp_path, "-k", "TestPublicAPI", pack=broken)
    assert code != 0 and "ComfyUI could not import the pack" in log, log[-4000:]
