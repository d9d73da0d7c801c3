"""Parameter tables: construction, round trips, and one clear error for every kind of broken file."""
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from epd_core.tables.params import EPDParams, EPDParamsError

REPO = Path(__file__).resolve().parents[1]


def example(steps=4, k=2):
    r = torch.rand(steps, k, generator=torch.Generator().manual_seed(0)) * 0.8 + 0.1
    w = torch.softmax(torch.randn(steps, k, generator=torch.Generator().manual_seed(1)), -1)
    c = 1 + 0.02 * torch.randn(steps, k, generator=torch.Generator().manual_seed(2)).clamp(-1, 1)
    return EPDParams.from_values(r, w, c, None, scale_dir=0.05, solver="epd_plugin", max_order=3, afs=True,
                                 schedule={"type": "polynomial", "rho": 7.0, "sigma_min": 0.002, "sigma_max": 80.0},
                                 model_family="gmm", guidance_scale=1.0), (r, w, c)


def test_from_values_round_trips_activated_values(tmp_path):
    params, (r, w, c) = example()
    torch.testing.assert_close(params.positions, r, atol=1e-6, rtol=0)
    torch.testing.assert_close(params.weights, w, atol=1e-6, rtol=0)
    torch.testing.assert_close(params.dir_scales, c, atol=1e-6, rtol=0)
    assert torch.equal(params.time_scales, torch.ones_like(r))
    loaded = EPDParams.load(params.save(tmp_path / "t.safetensors"))
    for a, b in zip(params.tensors(), loaded.tensors()):
        assert torch.equal(a, b)
    assert loaded.metadata["solver"] == "epd_plugin" and loaded.max_order == 3 and loaded.afs
    assert loaded.schedule["rho"] == 7.0 and loaded.num_points == 2 and loaded.num_steps == 4


def test_scale_bound_rejects_out_of_range_scales():
    with pytest.raises(EPDParamsError, match="outside the bound"):
        EPDParams.from_values([[0.5]], [[1.0]], [[1.2]], scale_dir=0.05)


def test_invalid_values_are_refused():
    with pytest.raises(EPDParamsError, match="inside"):
        EPDParams.from_values([[0.0, 0.5]], [[0.5, 0.5]])
    with pytest.raises(EPDParamsError, match="sum to 1"):
        EPDParams.from_values([[0.2, 0.5]], [[0.6, 0.6]])
    with pytest.raises(EPDParamsError, match="NaN"):
        EPDParams.from_values([[float("nan")]], [[1.0]])


def _rewrite(path, tensors=None, meta_patch=None, drop=None):
    params, _ = example()
    raw = EPDParams.from_bytes(params.to_bytes())
    t = {n: v for n, v in zip(("theta_r", "theta_w", "theta_c", "theta_a"), raw.tensors())}
    t.update(tensors or {})
    for n in drop or []:
        t.pop(n)
    header = {"epd_format_version": "1", "epd_scale_dir": "0.05", "epd_scale_time": "0.0",
              "epd_metadata": json.dumps(dict(params.metadata, num_steps=4, num_points=2))}
    header.update(meta_patch or {})
    path.write_bytes(st_save(t, metadata=header))
    return path


BROKEN = {
    "truncated": (lambda p: p.write_bytes(example()[0].to_bytes()[:40]), "truncated"),
    "empty": (lambda p: p.write_bytes(b""), "truncated"),
    "not safetensors": (lambda p: p.write_bytes(b"\x80\x04pickle?" * 10), "not a safetensors|truncated"),
    "header not utf8": (lambda p: p.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc" + b"\0" * 8), "UTF-8"),
    "plain safetensors": (lambda p: p.write_bytes(st_save({"x": torch.zeros(2)})), "not an EPD parameter file"),
    "future version": (lambda p: _rewrite(p, meta_patch={"epd_format_version": "99"}), "version"),
    "missing tensor": (lambda p: _rewrite(p, drop=["theta_w"]), "theta_w"),
    "wrong shape": (lambda p: _rewrite(p, tensors={"theta_c": torch.zeros(4, 3)}), "shape"),
    "3-d tensor": (lambda p: _rewrite(p, tensors={"theta_c": torch.zeros(4, 2, 1)}), "shape"),
    "int dtype": (lambda p: _rewrite(p, tensors={"theta_r": torch.zeros(4, 2, dtype=torch.int32)}), "dtype"),
    "nan": (lambda p: _rewrite(p, tensors={"theta_w": torch.full((4, 2), float("nan"))}), "NaN"),
    "inf": (lambda p: _rewrite(p, tensors={"theta_r": torch.full((4, 2), float("inf"))}), "NaN or inf"),
    "lying K": (lambda p: _rewrite(p, meta_patch={"epd_metadata": json.dumps({"num_points": 3})}), "K=3"),
    "lying steps": (lambda p: _rewrite(p, meta_patch={"epd_metadata": json.dumps({"num_steps": 9})}), "9 steps"),
    "bad json": (lambda p: _rewrite(p, meta_patch={"epd_metadata": "{not json"}), "unreadable"),
    "unknown solver": (lambda p: _rewrite(p, meta_patch={"epd_metadata": json.dumps({"solver": "magic"})}), "solver"),
    "bad scale": (lambda p: _rewrite(p, meta_patch={"epd_scale_dir": "7"}), "scale_dir"),
    "bad sigmas": (lambda p: _rewrite(p, meta_patch={"epd_metadata": json.dumps(
        {"schedule": {"type": "explicit", "sigmas": [1.0, 2.0, 0.5, 0.1, 0.01]}})}), "descending"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_every_broken_file_gives_one_clear_error_naming_the_file(tmp_path, case):
    make, expected = BROKEN[case]
    path = tmp_path / f"{case.replace(' ', '_')}.safetensors"
    make(path)
    with pytest.raises(EPDParamsError, match=expected) as err:
        EPDParams.load(path)
    assert str(path) in str(err.value)
    assert err.value.__class__ is EPDParamsError


def test_missing_file_and_unwritable_folder(tmp_path):
    with pytest.raises(EPDParamsError, match="cannot read"):
        EPDParams.load(tmp_path / "nope.safetensors")
    with pytest.raises(EPDParamsError, match="does not exist"):
        example()[0].save(tmp_path / "no_such_dir" / "t.safetensors")


def test_disk_full_during_save_leaves_earlier_file_intact(tmp_path):
    """A real write failure: the file-size limit (RLIMIT_FSIZE) makes the write fail like a full disk."""
    params, _ = example()
    path = params.save(tmp_path / "t.safetensors")
    before = path.read_bytes()
    code = f"""
import resource, signal, sys
sys.path.insert(0, {str(REPO)!r})
from epd_core.tables.params import EPDParams, EPDParamsError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))
try:
    EPDParams.neutral(50, 4).save({str(path)!r})
except EPDParamsError as e:
    print("ERROR:", e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "cannot write" in out.stdout and "unchanged" in out.stdout, out.stdout + out.stderr
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]  # no temp file left behind


def test_neutral_table_spreads_points_so_they_cannot_collapse():
    t = EPDParams.neutral(5, 3)
    r = t.positions
    assert (r[:, 0] < r[:, 1]).all() and (r[:, 1] < r[:, 2]).all()
    torch.testing.assert_close(t.weights, torch.full((5, 3), 1 / 3))
