"""The importer for the EPD authors' official predictor files (.pkl): exact conversion, metadata, sampling
equivalence, and refusal of anything that is not a plain official file, without running any of it.
All pickles are built here (with bench/official_pickle.py); no third-party file is involved."""
import collections
import hashlib
import io
import json
import os
import pickle
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import epd_core.tables.import_official as imp
from epd_core.sampling import schedules
from epd_core.tables import predictor_pickle
from epd_core.demo.gmm import GaussianMixtureDenoiser
from epd_core.tables.import_official import EPDImportError, import_official, import_official_bytes
from epd_core.tables.params import EPDParams, EPDParamsError
from epd_core.sampling.paper import sample_epd, sample_epd_plugin
from epd_core.tables.torch_storage import STORAGE_DTYPES, read_state_dict, read_storage
from bench.official_pickle import (FakeCall, FakeGlobal, fixed_bytes_storage_reduce, official_pickle, predictor_state,
                                   random_tables, sd15_attrs, zip_storage_reduce)

REPO = Path(__file__).resolve().parents[1]
NAMES = ("r_params", "weight_s", "scale_dir_params", "scale_time_params")  # official order = theta_r, w, c, a


def write(tmp_path, data: bytes, name="predictor.pkl") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def plugin_attrs(**overrides):
    """An EPD-Plugin (iPNDM student) predictor for a pixel-space EDM model."""
    attrs = sd15_attrs(num_steps=7, num_points=3, sampler_stu="ipndm", sampler_tea="heun", M=3, max_order=3,
                       schedule_type="polynomial", schedule_rho=7.0, afs=True, fcn=False, scale_dir=0.02,
                       scale_time=0.0, backend=None, backend_config={}, dataset_name="cifar10", img_resolution=32,
                       guidance_rate=None, sigma_min=0.002, sigma_max=80.0)
    attrs.update(overrides)
    return attrs


# ---- correct files -------------------------------------------------------------------------------------------
def test_sd15_predictor_imports_exactly(tmp_path):
    tables = random_tables(11, 2, seed=1)
    marker = tmp_path / "module_src_ran"
    # the embedded class source must never run: make it leave a trace if it did
    src = f"open({str(marker)!r}, 'w').close()\nclass EPD_predictor:\n    pass\n"
    path = write(tmp_path, official_pickle(tables, sd15_attrs(), module_src=src), "sd15_epd.pkl")
    params = import_official(path)

    for ours, name in zip(params.tensors(), NAMES):
        assert ours.dtype == torch.float32 and torch.equal(ours, tables[name])
    assert (params.scale_dir, params.scale_time) == (0.05, 0.05)
    m = params.metadata
    assert (m["solver"], m["max_order"], m["afs"], m["fix_last_dir_scale"]) == ("epd", 1, False, True)
    assert m["schedule"] == {"type": "discrete", "rho": 1.0}
    assert (m["guidance_scale"], m["model_family"], m["num_points"]) == (7.5, "sd15", 2)
    assert params.num_steps == 10  # 11 official time points
    prov = m["provenance"]
    assert prov["source"] == "sd15_epd.pkl"
    assert prov["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert prov["importer_version"] == imp.IMPORTER_VERSION
    assert (prov["teacher"], prov["M"], prov["dataset_name"], prov["img_resolution"]) == ("dpm", 1, "ms_coco", 64)
    assert prov["backend_config"]["resolution"] == 512 and prov["official_num_steps"] == 11
    json.dumps(m)  # everything is plain JSON
    assert not marker.exists()


def test_plugin_predictor_imports_exactly(tmp_path):
    tables = random_tables(7, 3, seed=2)
    params = import_official(write(tmp_path, official_pickle(tables, plugin_attrs())))
    for ours, name in zip(params.tensors(), NAMES):
        assert torch.equal(ours, tables[name])
    m = params.metadata
    assert (m["solver"], m["max_order"], m["afs"], m["fix_last_dir_scale"]) == ("epd_plugin", 3, True, False)
    assert m["schedule"] == {"type": "polynomial", "rho": 7.0, "sigma_min": 0.002, "sigma_max": 80.0}
    assert (m["guidance_scale"], m["model_family"], params.num_points, params.num_steps) == (None, "cifar10", 3, 6)
    assert (params.scale_dir, params.scale_time) == (0.02, 0.0)


def test_flow_schedule_numbers_come_from_backend_config(tmp_path):
    attrs = sd15_attrs(backend="sd3", dataset_name="ms_coco", schedule_type="flowmatch", schedule_rho=None,
                       backend_config={"resolution": 1024, "shift": 3.0}, scale_dir=None, scale_time=0)
    params = import_official(write(tmp_path, official_pickle(attrs=attrs)))
    assert params.metadata["schedule"] == {"type": "flowmatch", "shift": 3.0}
    assert params.metadata["model_family"] == "sd3"
    assert (params.scale_dir, params.scale_time) == (0.0, 0.0)  # None / 0 mean "disabled"


@pytest.mark.parametrize("backend,dataset,family", [("ldm", "ms_coco", "sd15"), ("flux", "ms_coco", "flux"),
                                                    ("ldm", "lsun_bedroom", "lsun_bedroom"), (None, "ffhq", "ffhq")])
def test_model_family(tmp_path, backend, dataset, family):
    params = import_official(write(tmp_path, official_pickle(attrs=sd15_attrs(backend=backend, dataset_name=dataset))))
    assert params.metadata["model_family"] == family


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("storage", ["legacy", "zip"])
def test_pickle_protocols_and_storage_formats(tmp_path, protocol, storage):
    tables = random_tables(seed=protocol)
    data = official_pickle(tables, protocol=protocol, storage_reduce=zip_storage_reduce if storage == "zip" else None)
    params = import_official(write(tmp_path, data))
    assert all(torch.equal(t, tables[n]) for t, n in zip(params.tensors(), NAMES))


def test_gpu_saved_storages_load_on_cpu(tmp_path):
    """Predictors trained on a GPU record 'cuda:0' storages; the importer maps them to the CPU."""
    tables = random_tables(seed=5)

    def cuda_storage(storage):
        func, (data,) = storage.__reduce__()
        patched = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
        assert patched != data
        return func, (patched,)
    params = import_official(write(tmp_path, official_pickle(tables, storage_reduce=cuda_storage)))
    assert torch.equal(params.theta_r, tables["r_params"])


def test_save_and_load_round_trip(tmp_path):
    params = import_official(write(tmp_path, official_pickle(random_tables(11, 2, seed=3))))
    out = params.save(tmp_path / "sd15.safetensors")
    loaded = EPDParams.load(out)
    assert all(torch.equal(a, b) for a, b in zip(loaded.tensors(), params.tensors()))
    assert (loaded.scale_dir, loaded.scale_time) == (params.scale_dir, params.scale_time)
    assert loaded.metadata == {**params.metadata, "num_steps": 10}


def official_values(tables, attrs):
    """r, w, c, a computed from the raw official logits with the official formulas (docs/method.md, "The table")."""
    def bounded(x, s):
        return 1 + (s or 0) * (2 * torch.sigmoid(x.double() / 2) - 1)
    c = bounded(tables["scale_dir_params"], attrs["scale_dir"])
    if attrs["fcn"]:
        c[-1] = 1.0
    return (torch.sigmoid(tables["r_params"].double()), torch.softmax(tables["weight_s"].double(), -1), c,
            bounded(tables["scale_time_params"], attrs["scale_time"]))


@pytest.mark.parametrize("kind", ["epd", "plugin"])
def test_sampling_with_imported_table_equals_direct_values(tmp_path, kind):
    attrs = sd15_attrs() if kind == "epd" else plugin_attrs(num_steps=11, num_points=2)
    tables = random_tables(11, 2, seed=4)
    params = import_official(write(tmp_path, official_pickle(tables, attrs)))
    r, w, c, a = official_values(tables, attrs)
    direct = EPDParams.from_values(r, w, c, a, scale_dir=attrs["scale_dir"] or 0.0,
                                   scale_time=attrs["scale_time"] or 0.0, solver=params.solver,
                                   max_order=params.max_order, afs=attrs["afs"])
    model = GaussianMixtureDenoiser(dim=16, seed=0)
    sigmas = schedules.with_final_zero(schedules.polynomial(11, 0.002, 80.0))  # 10 steps to sigma > 0 + final
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80.0
    sample = sample_epd if kind == "epd" else sample_epd_plugin
    got = sample(model, x, sigmas, params, disable=True)
    want = sample(model, x, sigmas, direct, disable=True)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the comparison is sensitive: a table with the w/c rows swapped differs clearly
    swapped = EPDParams(params.theta_r, params.theta_w.flip(-1), params.theta_c, params.theta_a,
                        params.scale_dir, params.scale_time, params.metadata)
    assert (sample(model, x, sigmas, swapped, disable=True) - want).abs().max() > 1e-3


# ---- refused files -----------------------------------------------------------------------------------------
@contextmanager
def nothing_written(tmp_path):
    before = sorted(p.name for p in tmp_path.iterdir())
    yield
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def refuse(tmp_path, data: bytes, *words: str) -> str:
    """Import must raise EPDImportError naming the file (and `words`), writing nothing."""
    path = write(tmp_path, data, "bad.pkl")
    with nothing_written(tmp_path), pytest.raises(EPDImportError) as err:
        import_official(path)
    msg = str(err.value)
    assert msg.startswith(str(path)), msg
    for word in words:
        assert word in msg, msg
    return msg


class SystemCall:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_os_system_reduce_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    forbidden = f"{os.system.__module__}.system"  # 'posix.system' on Linux/macOS
    refuse(tmp_path, pickle.dumps(SystemCall(f"touch {marker}")), forbidden, "nothing in it was run")
    # the same call hidden inside an otherwise legitimate predictor
    refuse(tmp_path, official_pickle(attrs=sd15_attrs(dataset_name=SystemCall(f"touch {marker}"))), forbidden)
    refuse(tmp_path, official_pickle(top={"loss_fn": SystemCall(f"touch {marker}")}), forbidden)
    assert not marker.exists()
    os.system(f"touch {marker}")  # sanity check of the test itself: the command does create the marker
    assert marker.exists()


def test_builtins_open_is_refused_and_writes_nothing(tmp_path):
    target = tmp_path / "written_by_pickle"
    evil = FakeCall(FakeGlobal("builtins", "open"), (str(target), "w"))
    refuse(tmp_path, official_pickle(attrs=sd15_attrs(alpha=evil)), "builtins.open")
    assert not target.exists()


@pytest.mark.parametrize("module,name", [
    ("subprocess", "Popen"), ("builtins", "eval"), ("builtins", "exec"), ("builtins", "getattr"),
    ("builtins", "__import__"), ("os", "system"), ("torch", "load"), ("torch._utils", "_rebuild_tensor"),
    ("torch.nn.modules.linear", "Linear"), ("torch_utils.persistence", "persistent_class"),
    ("collections", "OrderedDict.fromkeys"), ("copyreg", "_reconstructor"), ("numpy", "load"),
    ("builtins", "frozenset"), ("torch_utils.persistence", "_reconstruct_persistent_obj.__globals__"),
])
def test_unknown_globals_are_refused(tmp_path, module, name):
    evil = FakeCall(FakeGlobal(module, name), ("x",))
    refuse(tmp_path, official_pickle(attrs=sd15_attrs(alpha=evil)), f"'{module}.{name}'")


@pytest.mark.parametrize("data,words", [
    (b"\x80\x02(S'touch x'\nios\nsystem\n.", ["'os.system'"]),          # INST opcode (protocol 0 style)
    (b"\x80\x02X\x01\x00\x00\x00aQ.", ["persistent id"]),               # BINPERSID
    (b"\x80\x02Nr\xff\xff\xff\x7f.", ["memo index"]),                  # memo bomb for the C unpickler
    (b"\x80\x02cbuiltins\neval\nX\x01\x00\x00\x001\x85R.", ["'builtins.eval'"]),
    (b"\x80\x04\x95\x64\x00\x00\x00\x00\x00\x00\x00]\x94\x94\x94.", ["corrupt"]),  # ends before its frame
])
def test_crafted_opcodes_are_refused(tmp_path, data, words):
    refuse(tmp_path, data, *words)


@pytest.mark.parametrize("target", [b"torch._utils\n_rebuild_parameter\n", b"torch.nn.modules.activation\nSigmoid\n",
                                    b"collections\nOrderedDict\n"])
def test_build_cannot_modify_the_stand_ins(tmp_path, target):
    """BUILD with a slot state does setattr(obj, '__defaults__', (1,)) on whatever the global resolved to."""
    data = b"\x80\x02c" + target + b"N}X\x0c\x00\x00\x00__defaults__K\x01\x85s\x86b."
    refuse(tmp_path, data)
    assert predictor_pickle._rebuild_parameter.__defaults__ == (False, None)
    assert not hasattr(predictor_pickle._Sigmoid, "__defaults__")
    assert not hasattr(collections.OrderedDict, "__defaults__")
    import_official_bytes(official_pickle())  # the importer still works


def _torch_saved(obj, zip_format):
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=zip_format)
    return buf.getvalue()


# ---- our reader of torch's storage layouts (epd_core/tables/torch_storage.py) against torch's own serialization
# -------
def _values(dtype, n=37):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * 100
    return x > 0 if dtype == torch.bool else x.to(dtype)


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("zip_format", [False, True])
@pytest.mark.parametrize("dtype", [getattr(torch, name) for name in sorted(set(STORAGE_DTYPES.values()))])
def test_storages_read_exactly_as_torch_writes_them(dtype, zip_format, protocol):
    for values in (_values(dtype), torch.empty(0, dtype=dtype)):  # also an empty storage
        buf = io.BytesIO()
        torch.save(values._typed_storage(), buf, _use_new_zipfile_serialization=zip_format, pickle_protocol=protocol)
        flat = read_storage(buf.getvalue())
        assert flat.dtype == dtype and torch.equal(flat, values)
        assert flat.untyped_storage().data_ptr() != values.untyped_storage().data_ptr() or not len(values)
    buf = io.BytesIO()  # an untyped storage is bytes
    torch.save(_values(dtype).untyped_storage(), buf, _use_new_zipfile_serialization=zip_format)
    assert torch.equal(read_storage(buf.getvalue()), _values(dtype).view(-1).view(torch.uint8))


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("zip_format", [False, True])
def test_state_dicts_read_exactly_as_torch_loads_them(tmp_path, zip_format, protocol):
    net = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2).half())
    tied = torch.randn(4, 6)
    obj = {"state_dict": net.state_dict(), "epoch": 3, "name": "x", "tied": [tied, tied.t(), tied[1:, ::2]],
           "scalar": torch.tensor(2.5), "param": torch.nn.Parameter(torch.ones(2))}
    path = tmp_path / "w.pt"
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format, pickle_protocol=protocol)
    ours = read_state_dict(path)
    # the reference, on a file this test wrote itself (torch's weights-only loader reads protocol 2 only: it lacks
    # the FRAME opcode of protocols 4 and 5)
    theirs = torch.load(path, weights_only=protocol == 2)

    def same(a, b):
        if isinstance(b, torch.Tensor):
            return type(a) is torch.Tensor and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        if isinstance(b, dict):
            return isinstance(a, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in b)
        if isinstance(b, (list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return a == b and type(a) is type(b)
    assert same(ours, theirs)


@pytest.mark.parametrize("payload", ["raw_pickle", "legacy", "zip"])
def test_malicious_storage_bytes_are_refused_by_our_storage_parser(tmp_path, payload):
    marker = tmp_path / "pwned_by_storage"
    evil = SystemCall(f"touch {marker}")
    data = pickle.dumps(evil) if payload == "raw_pickle" else _torch_saved(evil, payload == "zip")
    msg = refuse(tmp_path, official_pickle(storage_reduce=fixed_bytes_storage_reduce(data)), "a tensor storage",
                 "refused")
    assert "the Python global 'posix.system'" in msg or "'nt.system'" in msg, msg
    assert not marker.exists()


def test_storage_bytes_holding_a_tensor_are_refused(tmp_path):
    payload = _torch_saved(torch.zeros(20), zip_format=True)  # weights-only safe, but not a storage
    refuse(tmp_path, official_pickle(storage_reduce=fixed_bytes_storage_reduce(payload)), "a tensor storage",
           "'torch._utils._rebuild_tensor_v2'")


def test_oversized_tensor_is_refused_before_allocation(tmp_path):
    state = predictor_state(random_tables(), sd15_attrs())
    rebuild = FakeGlobal("torch._utils", "_rebuild_tensor_v2")
    storage = torch.zeros(4)._typed_storage()
    state["_parameters"]["r_params"] = FakeCall(rebuild, (storage, 0, (10 ** 6, 10 ** 6), (0, 0), False, None))
    data = official_pickle(top={"model": FakeCall(FakeGlobal("torch_utils.persistence",
                                                             "_reconstruct_persistent_obj"),
                                                  ({"type": "class", "class_name": "EPD_predictor",
                                                    "state": state},))})
    refuse(tmp_path, data, "1048576 bytes of tensor data")  # the opcode walk refuses it before any call


@pytest.mark.parametrize("change,words", [
    (dict(num_steps=12), ["r_params", "shape (10, 2)", "(11, 2)"]),
    (dict(num_points=3), ["num_points=3"]),
    (dict(sampler_stu="heun"), ["'heun'", "not supported"]),
    (dict(sampler_stu="ipndm", max_order=7), ["max_order=7"]),
    (dict(schedule_type="karras"), ["'karras'"]),
    (dict(scale_dir=2.0), ["scale_dir"]),
    (dict(afs="yes"), ["'afs'"]),
    (dict(num_steps="11"), ["'num_steps'"]),
])
def test_inconsistent_predictors_are_refused(tmp_path, change, words):
    refuse(tmp_path, official_pickle(attrs=sd15_attrs(**change)), *words)


def test_non_finite_and_wrong_structures_are_refused(tmp_path):
    tables = random_tables()
    tables["weight_s"][3, 1] = float("nan")
    refuse(tmp_path, official_pickle(tables), "weight_s", "NaN")
    refuse(tmp_path, official_pickle(class_name="EPD_loss"), "'EPD_loss'", "not an EPD_predictor")
    refuse(tmp_path, official_pickle(top={"model": {"r_params": [1.0]}}), "'model' entry")
    refuse(tmp_path, pickle.dumps({"ema": 1}), "'model' entry")
    refuse(tmp_path, pickle.dumps([1, 2, 3]), "'model' entry")
    state = predictor_state(random_tables(), sd15_attrs())
    del state["_parameters"]["scale_time_params"]
    refuse(tmp_path, official_pickle(top={"model": FakeCall(FakeGlobal("torch_utils.persistence",
                                                                       "_reconstruct_persistent_obj"),
                                                            ({"type": "class", "class_name": "EPD_predictor",
                                                              "state": state},))}), "'scale_time_params' is missing")


def test_every_truncation_is_refused(tmp_path):
    data = official_pickle(random_tables(3, 1), sd15_attrs(num_steps=3, num_points=1))
    path = tmp_path / "cut.pkl"
    for n in range(len(data)):
        with pytest.raises(EPDImportError) as err:
            import_official_bytes(data[:n], source=str(path))
        assert str(err.value).startswith(str(path))
    import_official_bytes(data, source=str(path))  # the full file is fine
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("data,words", [
    (b"", ["empty"]),
    (b"hello, this is text\n", ["not a pickle"]),
    (b"PK\x03\x04" + bytes(60), ["zip archive"]),
    (pickle.dumps({"model": 1}, protocol=0), ["not a pickle of protocol 2"]),
    (pickle.dumps({"model": 1}, protocol=4) + b"junk", ["4 unexpected bytes"]),
    (bytes(range(256)) * 4, ["not a pickle"]),
])
def test_non_pickle_files_are_refused(tmp_path, data, words):
    refuse(tmp_path, data, *words)


def test_safetensors_and_checkpoints_get_a_helpful_message(tmp_path):
    table = EPDParams.neutral(4).to_bytes()
    refuse(tmp_path, table, "safetensors", "no conversion is needed")
    refuse(tmp_path, _torch_saved({"model": torch.zeros(2)}, zip_format=True), "zip archive")


def test_size_guard_and_missing_file(tmp_path, monkeypatch):
    data = official_pickle()
    monkeypatch.setattr(imp, "MAX_PKL_BYTES", len(data) - 1)
    refuse(tmp_path, data, "far too large")
    with pytest.raises(EPDImportError, match="cannot read"):
        import_official(tmp_path / "missing.pkl")
    assert issubclass(EPDImportError, EPDParamsError) and issubclass(EPDImportError, ValueError)


# ---- command line ------------------------------------------------------------------------------------------
def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "epd_core.import_official", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_converts_and_prints(tmp_path):
    tables = random_tables(seed=6)
    src = write(tmp_path, official_pickle(tables))
    out = tmp_path / "sd15.safetensors"
    proc = run_cli(src, out, "--print")
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "r0" in proc.stdout and len(proc.stdout.splitlines()) >= 12
    assert torch.equal(EPDParams.load(out).theta_w, tables["weight_s"])


def test_cli_bad_file_exits_2_with_clear_message(tmp_path):
    marker = tmp_path / "pwned"
    src = write(tmp_path, pickle.dumps(SystemCall(f"touch {marker}")), "evil.pkl")
    out = tmp_path / "out.safetensors"
    proc = run_cli(src, out)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {src}:") and "refused" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not marker.exists()
    proc = run_cli(src, src)  # never overwrite the input
    assert proc.returncode == 2 and "overwrite the input" in proc.stderr and src.exists()


# ---- fuzzing -----------------------------------------------------------------------------------------------
FUZZ_BASE = official_pickle(random_tables(3, 2), sd15_attrs(num_steps=3))
FUZZ_CASES = []


@contextmanager
def time_limit(seconds):
    def raise_timeout(*_):
        raise TimeoutError(f"import took more than {seconds} s")
    old = signal.signal(signal.SIGALRM, raise_timeout)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.integers(0, len(FUZZ_BASE) - 1), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.integers(0, len(FUZZ_BASE))),
       insert=st.one_of(st.none(), st.tuples(st.integers(0, len(FUZZ_BASE)), st.binary(min_size=1, max_size=8))))
def test_fuzzed_files_fail_cleanly(edits, cut, insert):
    data = bytearray(FUZZ_BASE)
    for pos, value in edits:
        data[pos] = value
    if insert is not None:
        data[insert[0]:insert[0]] = insert[1]
    if cut is not None:
        del data[cut:]
    FUZZ_CASES.append(bytes(data))
    with time_limit(20):
        try:
            params = import_official_bytes(bytes(data), source="fuzz.pkl")
        except EPDImportError as e:
            assert str(e).startswith("fuzz.pkl: ")
        else:
            params.validate()
            assert params.tensors()[0].shape == (2, 2)


def test_fuzz_ran_enough_cases():
    """Reports (and checks) how many fuzz cases the test above ran in this session."""
    if not FUZZ_CASES:
        pytest.skip("the fuzz test did not run in this session")
    print(f"fuzz cases: {len(FUZZ_CASES)}, distinct: {len(set(FUZZ_CASES))}")
    assert len(set(FUZZ_CASES)) >= 50


# ---- ComfyUI node ------------------------------------------------------------------------------------------
# the pack loaded as ComfyUI loads it, in a fresh process: argv = repo, ComfyUI folder, the epd_params folder
PACK_IN_A_PROCESS = r"""
import importlib.util, json, sys
from pathlib import Path
repo, comfy, models = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
sys.path.append(comfy)
import comfy.cli_args
comfy.cli_args.args.cpu = True
spec = importlib.util.spec_from_file_location("ComfyUI_EPD", repo / "__init__.py",
                                              submodule_search_locations=[str(repo)])
pack = importlib.util.module_from_spec(spec); sys.modules["ComfyUI_EPD"] = pack; spec.loader.exec_module(pack)
import folder_paths
"""
NODE_SCRIPT = PACK_IN_A_PROCESS + r"""
folder_paths.folder_names_and_paths["epd_params"] = ([models], {".safetensors", ".pkl"})
from ComfyUI_EPD.nodes.import_node import EPDImportPredictor, IMPORT_NODES
info = EPDImportPredictor.GET_NODE_INFO_V1()
inputs = {**info["input"]["required"], **info["input"].get("optional", {})}
result = {"node_id": info["name"], "category": info["category"], "options": inputs["predictor"][1]["options"],
          "tooltips": all(spec[1].get("tooltip") for spec in inputs.values()), "output": info["output"],
          "n_nodes": len(IMPORT_NODES)}
out = EPDImportPredictor.execute(predictor="sd15 predictor.pkl", output_name="", overwrite=False)
result["describe"] = out.args[0].describe()
EPDImportPredictor.execute(predictor="sd15 predictor.pkl", output_name="", overwrite=False)  # same again: fine
for kwargs in ({"predictor": "evil.pkl", "output_name": "x", "overwrite": False},
               {"predictor": "sd15 predictor.pkl", "output_name": "other", "overwrite": False},
               {"predictor": "x", "output_name": "", "overwrite": False, "pkl_path": "/etc/passwd"},
               {"predictor": "sd15 predictor.pkl", "output_name": "../escape", "overwrite": True}):
    try:
        EPDImportPredictor.execute(**kwargs)
        result.setdefault("errors", []).append(None)
    except Exception as e:
        result.setdefault("errors", []).append(f"{type(e).__name__}: {e}")
print("RESULT" + json.dumps(result))
"""


def test_import_node_converts_into_the_models_folder(tmp_path):
    comfy = Path(os.environ.get("COMFYUI_PATH", REPO / ".comfyui"))
    if not (comfy / "comfy_api").is_dir():
        pytest.skip("no ComfyUI runtime (run scripts/setup_runtime.sh)")
    models = tmp_path / "epd_params"
    models.mkdir()
    tables = random_tables(seed=7)
    write(models, official_pickle(tables), "sd15 predictor.pkl")
    write(models, pickle.dumps(SystemCall(f"touch {tmp_path / 'pwned'}")), "evil.pkl")
    (models / "other.safetensors").write_bytes(EPDParams.neutral(3).to_bytes())
    proc = subprocess.run([sys.executable, "-c", NODE_SCRIPT, str(REPO), str(comfy), str(models)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    res = json.loads(lines[0][len("RESULT"):])
    assert (res["node_id"], res["category"], res["output"], res["n_nodes"]) == (
        "EPDImportPredictor", "sampling/epd", ["EPD_PARAMS"], 1)
    local = [o for o in res["options"] if not o.startswith("official: ")]  # then the published names (issue 16)
    assert sorted(local) == ["evil.pkl", "sd15 predictor.pkl"] and res["tooltips"]
    assert res["options"][len(local):] == [f"official: {name}" for name in imp.OFFICIAL_FILES]
    assert res["describe"].startswith("epd K=2 steps=10 schedule=discrete")
    assert torch.equal(EPDParams.load(models / "sd15 predictor.safetensors").theta_r, tables["r_params"])
    evil, clash, outside, escape = res["errors"]
    assert evil.startswith("EPDImportError: ") and "evil.pkl" in evil and "refused" in evil
    assert "already exists" in clash and "overwrite" in clash
    assert "/etc/passwd" in outside and "not an existing .pkl" in outside
    assert "not a plain file name" in escape and not (tmp_path / "escape.safetensors").exists()
    assert not (tmp_path / "pwned").exists() and not (models / "x.safetensors").exists()


def test_a_torch_zip_passes_when_any_zip_format_s_budget_holds_it(monkeypatch):
    """formats.py may list several formats that read torch zips: a zip is checked against each one's budget (and
    refused with the first one's problem when none holds it), not only the first's."""
    import types

    from epd_core.tables import dyweight_format
    from epd_core.tables.torch_storage import Limits
    buf = io.BytesIO()
    torch.save({f"t{i}": torch.zeros(2) for i in range(20)}, buf)  # 20 storages: over DyWeight's budget of 16
    data = buf.getvalue()

    def parse(formats):
        monkeypatch.setattr(predictor_pickle, "FORMATS", formats)
        problems = []
        try:
            return predictor_pickle.parse(data, lambda problem, fix: problems.append((problem, fix)) or 1 / 0)
        except ZeroDivisionError:
            return problems[0]
    problem, fix = parse((dyweight_format,))
    assert "more than 16 storage(s)" in problem and fix == dyweight_format.FIX_ZIP
    roomy = types.SimpleNamespace(ZIP_LIMITS=Limits(opcodes=4000, depth=8, items=64, storages=32, tensors=32,
                                                    pickle_bytes=64 * 1024), FIX_ZIP="another format's fix")
    assert parse((dyweight_format, roomy)) is None  # held by the second format's budget: its converter reads it
