"""Security review regressions (issue 14) that need no server: hostile predictor pickles (memory bomb through
shared references, huge integers, BUILD on the OrderedDict stand-in, oversized names), hostile table files
(deeply nested JSON), and the preview's cap on what it draws; issue 29: hostile storage bytes and reward files
(our own torch-layout parser, never torch.load) and the isolated converter's budgets. The attacks through a real
ComfyUI server are in tests/test_security_server.py; bench/hostile_imports.py measures time and memory."""
import io
import json
import re
import resource
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import epd_core.tables.import_official as imp
from epd_core.tables.import_official import EPDImportError, import_official_bytes, import_official_isolated
from epd_core.tables.params import MAX_METADATA_DEPTH, EPDParams, EPDParamsError
from bench import hostile_pickles
from bench.official_pickle import FakeGlobal, official_pickle, random_tables, sd15_attrs

REPO = Path(__file__).resolve().parents[1]


def shared_list_bomb(width: int, depth: int):
    """`width` references to ONE list, nested `depth` deep: pickle memoises the shared list, so the file stays
    a few kB while a naive recursive copy visits width**depth nodes."""
    inner = []
    for _ in range(depth):
        inner = [inner] * width
    return inner




# ---- item 1: memory bomb in the predictor importer ---------------------------------------------------------
@pytest.mark.parametrize("depth", [3, 6])
def test_shared_reference_bomb_in_M_is_refused_within_the_provenance_budget(tmp_path, depth):
    data = official_pickle(attrs=sd15_attrs(M=shared_list_bomb(64, depth)))
    assert len(data) < 8000  # a small file ...
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(EPDImportError) as err:  # ... that the old plain-data copy expanded to 64**depth nodes
        import_official_bytes(data, source="bomb.pkl")  # (depth 6: MemoryError)
    msg = str(err.value)
    assert msg.startswith("bomb.pkl: refused") and "'M'" in msg and "nothing was written" in msg
    assert "holds more than 2000 values" in msg  # the copy stopped at its budget of visited values
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 200 * 1024  # kB: no big allocation


def test_bomb_through_the_cli_writes_nothing(tmp_path):
    import subprocess
    src = tmp_path / "bomb.pkl"
    src.write_bytes(official_pickle(attrs=sd15_attrs(backend_config={"a": shared_list_bomb(64, 6)})))
    out = tmp_path / "out.safetensors"
    proc = subprocess.run([sys.executable, "-m", "epd_core.import_official", str(src), str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "refused" in proc.stderr and "'backend_config'" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_provenance_keeps_only_the_listed_fields_and_stays_small(tmp_path):
    attrs = sd15_attrs(backend_config={"resolution": 512, "list": list(range(500))},
                       unrelated_attribute="x" * 10000)
    params = import_official_bytes(official_pickle(attrs=attrs))
    prov = params.metadata["provenance"]
    assert "unrelated_attribute" not in json.dumps(prov)
    assert len(prov["backend_config"]["list"]) == 64 and prov["backend_config"]["resolution"] == 512
    assert len(json.dumps(params.metadata)) < 20000


# ---- item 4: errors escaping the pack's error types -------------------------------------------------------
def test_huge_integers_do_not_escape_as_overflow_or_value_errors(tmp_path):
    attrs = sd15_attrs(guidance_rate=10 ** 400, M=10 ** 5000, alpha=-(10 ** 30))
    params = import_official_bytes(official_pickle(attrs=attrs))  # was OverflowError (float(10**400))
    m = params.metadata
    assert m["guidance_scale"] is None
    assert m["provenance"]["M"] == "<int too large>" and m["provenance"]["alpha"] == "<int too large>"
    out = params.save(tmp_path / "t.safetensors")  # was ValueError: int too large to convert to str
    assert EPDParams.load(out).metadata["provenance"]["M"] == "<int too large>"
    with pytest.raises(EPDImportError, match="'num_steps' is a very large integer"):
        import_official_bytes(official_pickle(attrs=sd15_attrs(num_steps=10 ** 5000)))


class _OrderedDictWithGet(dict):
    """Pickles as OrderedDict() + BUILD {'get': ...} + SETITEMS: an instance attribute named `get`, which the
    real OrderedDict accepts (its instances have a __dict__) and which shadows dict.get for the importer."""

    def __reduce__(self):
        return FakeGlobal("collections", "OrderedDict"), (), {"get": "not callable"}, None, iter(self.items())


def test_build_setting_get_on_the_ordered_dict_stand_in_is_refused(tmp_path):
    from bench.official_pickle import OfficialPickler, persistent_model, predictor_state
    state = predictor_state(random_tables(), sd15_attrs())
    state["_parameters"] = _OrderedDictWithGet(state["_parameters"])
    buf = io.BytesIO()
    OfficialPickler(buf, 4).dump({"model": persistent_model(state)})
    with pytest.raises(EPDImportError) as err:  # was TypeError: 'str' object is not callable
        import_official_bytes(buf.getvalue(), source="get.pkl")
    assert str(err.value).startswith("get.pkl: ")


def test_ordered_dicts_still_import_as_plain_ordered_dicts():
    tables = random_tables(seed=3)
    for protocol in (2, 4):
        params = import_official_bytes(official_pickle(tables, protocol=protocol))
        assert torch.equal(params.theta_r, tables["r_params"])


def _safetensors_bytes(header: str, payload: bytes = b"") -> bytes:
    raw = header.encode()
    return struct.pack("<Q", len(raw)) + raw + payload


def _table_header(meta_json: str) -> str:
    t = {"dtype": "F32", "shape": [1, 1], "data_offsets": [0, 4]}
    tensors = {n: dict(t, data_offsets=[4 * i, 4 * i + 4]) for i, n in enumerate(("theta_r", "theta_w", "theta_c",
                                                                                   "theta_a"))}
    return json.dumps({"__metadata__": {"epd_format_version": "1", "epd_scale_dir": "0.0", "epd_scale_time": "0.0",
                                        "epd_metadata": meta_json}, **tensors})


@pytest.mark.parametrize("where,depth", [("header", 100000), ("epd_metadata", 200), ("epd_metadata", 100000)])
def test_deeply_nested_json_is_an_EPDParamsError(where, depth):
    nested = "[" * depth + "]" * depth
    if where == "header":
        head = _table_header(json.dumps({"solver": "epd"}))[:-1] + f', "junk": {nested}}}'
    else:
        head = _table_header('{"solver": "epd", "provenance": {"x": ' + nested + "}}")
    data = _safetensors_bytes(head, bytes(16))
    with pytest.raises(EPDParamsError) as err:  # was RecursionError (deep) or a table that clone() cannot copy
        EPDParams.from_bytes(data, source="deep.safetensors")
    assert str(err.value).startswith("deep.safetensors: ") and "nested" in str(err.value)


def test_metadata_depth_limit_is_enforced_on_construction_and_save(tmp_path):
    deep = {}
    node = deep
    for _ in range(MAX_METADATA_DEPTH + 2):
        node["x"] = {}
        node = node["x"]
    with pytest.raises(EPDParamsError, match="nested more than"):
        EPDParams.neutral(2, provenance=deep)
    ok = EPDParams.neutral(2, provenance={"a": {"b": [1, 2, {"c": 3}]}})
    assert EPDParams.load(ok.save(tmp_path / "ok.safetensors")).metadata["provenance"] == {"a": {"b": [1, 2, {"c": 3}]}}


# ---- item 4: names --------------------------------------------------------------------------------------
def test_multi_megabyte_dataset_name_is_refused_at_import(tmp_path):
    data = official_pickle(attrs=sd15_attrs(backend=None, dataset_name="a" * 900_000))  # under the 1 MB file budget
    with pytest.raises(EPDImportError) as err:  # was: imported, then the saved file could not be loaded
        import_official_bytes(data, source="bomb.pkl")
    msg = str(err.value)
    assert "'dataset_name'" in msg and "plain name" in msg and len(msg) < 600


@pytest.mark.parametrize("family", ["x" * 65, "sd15\n", "a/b", "", "../x", 7])
def test_model_family_must_be_a_plain_name(tmp_path, family):
    with pytest.raises(EPDParamsError, match="model_family"):
        EPDParams.neutral(2, model_family=family)


def test_model_family_plain_names_still_work(tmp_path):
    for family in ("sd15", "epd_demo_digits", "sd15_flow", "hunyuan_video", "flux2"):
        EPDParams.neutral(2, model_family=family)
    params = import_official_bytes(official_pickle(attrs=sd15_attrs(backend=None, dataset_name="LSUN_Bedroom-256")))
    assert params.metadata["model_family"] == "lsun_bedroom-256"


# ---- issue 21, item 1: the opcode walk bounds what unpickling builds ----------------------------------------
def refused_within_budget(data: bytes, *words, max_growth_mb: float = 20):
    """The importer refuses `data` naming the budget it ran out of (so the work it did is that budget's, whatever
    the machine's speed) and within `max_growth_mb` MB of peak memory; returns the message, which must name the
    file and the budget."""
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(EPDImportError) as err:
        import_official_bytes(data, source="hostile.pkl")
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024 < max_growth_mb
    msg = str(err.value)
    assert msg.startswith("hostile.pkl: refused") and "budget" in msg and "Nothing in it was" in msg, msg
    for word in words:
        assert word in msg, msg
    return msg


@pytest.mark.parametrize("build", [hostile_pickles.deep_tuple_key, hostile_pickles.deep_tuple_set_item])
def test_deep_tuple_key_is_refused_by_the_cli_instead_of_crashing_it(tmp_path, build):
    src = tmp_path / "deep.pkl"
    src.write_bytes(build())  # 200 kB
    proc, seconds, _ = hostile_pickles.run_cli(src, tmp_path / "out.safetensors")
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-500:])  # was -11: SIGSEGV while hashing the key
    assert f"error: {src}: refused" in proc.stderr and "nesting depth 32" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out.safetensors").exists()


def test_colliding_integer_keys_are_refused_before_hashing():
    # 3000 keys (under the opcode budget) are refused by the key rule; 40,000 took 16 s in one C call before
    refused_within_budget(hostile_pickles.colliding_int_keys(3000), "uses an int as a dict key",
                 "dict keys are strings of at most 128 characters")
    refused_within_budget(hostile_pickles.colliding_int_keys(40_000), "10000 opcodes")


def test_a_megabyte_of_empty_sets_is_refused_with_near_baseline_memory():
    refused_within_budget(hostile_pickles.empty_sets(1_000_000), "more than 10000 opcodes")  # was +246 MB


def test_memo_reused_stride_zero_views_are_refused_before_any_is_built():
    # 50 calls: was +100 MB (2 MiB per call from 6 bytes of file); a single one already claims 2 MiB
    refused_within_budget(hostile_pickles.stride_zero_views(50), "1048576 bytes of tensor data", "shape (4096, 64)")
    refused_within_budget(hostile_pickles.stride_zero_views(20, shape=(8, 8)),
                          "_rebuild_tensor_v2 (REDUCE) more than 16")


def test_a_view_larger_than_its_storage_is_refused_not_materialised():
    msg = refused_within_budget(hostile_pickles.stride_zero_views(1, shape=(64, 64)), "claims 4096 elements from a "
                       "storage of 1", "a view never holds more elements than its storage")
    assert "file corrupt" not in msg  # was: cloned into a 4096-element tensor (larger shapes: 'file corrupt')


def test_memo_reused_codecs_encode_is_refused():
    # was 20 MB of copies, 1 MB -> 3 GB
    refused_within_budget(hostile_pickles.codecs_encode_copies(200), "_codecs.encode")


@pytest.mark.parametrize("data,words", [
    (b"\x80\x04" + b"]" * 40 + b"a" * 39 + b".", ["32 levels deep"]),                  # nested lists
    (b"\x80\x04" + b"(" * 40 + b".", ["nested MARKs"]),
    (b"\x80\x04](" + b"N" * 1001 + b"e.", ["more than 1000 items"]),
    (b"\x80\x04}(X" + (200).to_bytes(4, "little") + b"a" * 200 + b"Nu.", ["long string as a dict key"]),
    (b"\x80\x04]\x94h\x00h\x00a.", ["changes a list after using it"]),                   # a list holding itself
    (b"\x80\x04\x8f(J\x07\x00\x00\x00\x90.", ["an int as a set item"]),
    (b"\x80\x04(\x8a\x01\x07\x91.", ["an int as a set item"]),                             # FROZENSET
    (b"\x80\x04" + hostile_pickles.global_("builtins", "set") + b"](K\x01e\x85R.", ["set from items"]),
    (b"\x80\x04\x82\x01.", ["EXT1"]),
    (b"\x80\x04" + hostile_pickles.global_("collections", "OrderedDict") + b")\x81.", ["NEWOBJ"]),
    (b"\x80\x04}N\x85R.", ["calls a dict"]),
])
def test_opcode_walk_budgets(data, words):
    msg = str(pytest.raises(EPDImportError, import_official_bytes, data, source="hostile.pkl").value)
    assert msg.startswith("hostile.pkl: "), msg
    for word in words:
        assert word in msg, msg


# ---- issue 21, item 4: schedule numbers and flags of a table are checked at load ----------------------------
@pytest.mark.parametrize("schedule,words", [
    ("polynomial", "'schedule' must be an object"),
    ({"type": "polynomial", "rho": 1e-320}, "schedule 'rho' is 1e-320"),                       # was: NaN sigmas
    ({"type": "polynomial", "sigma_min": -1.0, "sigma_max": 80.0}, "schedule 'sigma_min' is -1.0"),
    ({"type": "polynomial", "sigma_min": "0.002"}, "schedule 'sigma_min' is '0.002'"),          # was: TypeError
    ({"type": "polynomial", "sigma_min": 80.0, "sigma_max": 1.0}, "is not below sigma_max"),
    ({"type": "polynomial", "rho": True}, "schedule 'rho' is True"),
    ({"type": "explicit", "to_zero": "yes"}, "schedule 'to_zero' is 'yes'"),
])
def test_table_schedules_with_bad_numbers_are_refused_at_load(schedule, words):
    table = EPDParams.neutral(3)
    table.metadata["schedule"] = schedule
    with pytest.raises(EPDParamsError, match="my.safetensors: .*" + words.replace("(", r"\(").replace(".", r"\.")):
        EPDParams.from_bytes(_raw_table_bytes(table), source="my.safetensors")


@pytest.mark.parametrize("value", ["false", "no", 2, None])
def test_afs_must_be_a_boolean(value):
    table = EPDParams.neutral(3)
    table.metadata["afs"] = value  # was: "false" turned AFS on (a non-empty string is true)
    with pytest.raises(EPDParamsError, match="metadata 'afs' is .*expected true or false"):
        EPDParams.from_bytes(_raw_table_bytes(table), source="my.safetensors")


def _raw_table_bytes(table: EPDParams) -> bytes:
    """The table's file as written by save(), but without the checks save() runs (a hand-edited header)."""
    from safetensors.torch import save as st_save
    header = {"epd_format_version": "1", "epd_scale_dir": "0.0", "epd_scale_time": "0.0",
              "epd_metadata": json.dumps(table.metadata)}
    return st_save({n: t.contiguous() for n, t in zip(("theta_r", "theta_w", "theta_c", "theta_a"),
                                                       table.tensors())}, metadata=header)


@pytest.mark.parametrize("attrs,words", [
    (dict(schedule_type="polynomial", schedule_rho=1e-320), "schedule 'rho' is 1e-320"),
    (dict(schedule_type="polynomial", schedule_rho=7.0, sigma_min=-1.0, sigma_max=80.0),
     "schedule 'sigma_min' is -1.0"),
])
def test_predictors_with_bad_schedule_numbers_are_refused(attrs, words):
    with pytest.raises(EPDImportError, match="p.pkl: the converted table is invalid .*" + re.escape(words)):
        import_official_bytes(official_pickle(attrs=sd15_attrs(backend=None, backend_config={}, **attrs)),
                              source="p.pkl")  # was: imported, then NaN or negative sigmas


def test_a_huge_global_name_is_refused_with_a_short_message():
    data = b"\x80\x04c" + b"m" * 500_000 + b"\nx\n."
    msg = str(pytest.raises(EPDImportError, import_official_bytes, data, source="hostile.pkl").value)
    assert "asks for the Python global 'mmm" in msg and len(msg) < 600, len(msg)  # was: the 500 kB name echoed


# ---- issue 29: nothing untrusted reaches torch.load -----------------------------------------------------------
MAX_GROWTH_MB = 50  # what a refusal may add to the process's peak memory (a generous bound, not a timing)
STORAGE_ATTACKS = list(hostile_pickles.STORAGE_ATTACKS)


def peak_growth_mb(fn) -> float:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


@pytest.mark.parametrize("title", STORAGE_ATTACKS)
def test_hostile_storage_bytes_are_refused_by_our_parser_with_the_problem_named(title):
    build, words = hostile_pickles.STORAGE_ATTACKS[title]
    data = hostile_pickles.storage_call(build())
    import_official_bytes(official_pickle())  # first-call allocations, before the peak is read
    errors = []

    def refuse():
        with pytest.raises(EPDImportError) as err:
            import_official_bytes(data, source="hostile.pkl")
        errors.append(str(err.value))
    assert peak_growth_mb(refuse) < MAX_GROWTH_MB  # was: SIGSEGV, 38 s frozen, or +236..+576 MB
    msg = errors[0]
    assert msg.startswith("hostile.pkl: refused: a tensor storage: ") and words in msg, msg
    assert "Nothing in it was" in msg or "nothing in it was run" in msg, msg
    assert len(msg) < 800


@pytest.mark.parametrize("title", STORAGE_ATTACKS)
def test_hostile_storages_through_the_cli_are_refused_and_write_nothing(tmp_path, title):
    build, words = hostile_pickles.STORAGE_ATTACKS[title]
    src = tmp_path / "hostile.pkl"
    src.write_bytes(hostile_pickles.storage_call(build()))
    out = tmp_path / "out.safetensors"
    proc, _, _ = hostile_pickles.run_cli(src, out)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-800:])
    assert f"error: {src}: refused: a tensor storage: " in proc.stderr and words in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostile.pkl"]


def test_no_file_byte_reaches_torch_load_or_pickle_loads_anywhere_in_the_pack():
    """Parsed, not grepped (docstrings and the command a user runs on a file they trust may name them): the pack
    calls no torch.load / pickle.load(s) / torch.serialization loader and defines no Unpickler: every pickle is
    run by our own bounded evaluator (epd_core/tables/torch_storage.py)."""
    import ast
    offenders, unpicklers = [], []
    for path in sorted((REPO / "epd_core").rglob("*.py")) + sorted((REPO / "nodes").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if (node.value.id, node.attr) in {("torch", "load"), ("pickle", "load"), ("pickle", "loads"),
                                                  ("_pickle", "load"), ("_pickle", "loads"), ("serialization", "load"),
                                                  ("torch", "serialization"), ("marshal", "loads"),
                                                  ("dill", "load"), ("dill", "loads"), ("joblib", "load"),
                                                  ("pickle", "Unpickler"), ("_pickle", "Unpickler")}:
                    offenders.append(f"{where}: {node.value.id}.{node.attr}")
            if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "_pickle", "torch.serialization"):
                offenders.append(f"{where}: from {node.module} import ...")
            if isinstance(node, ast.ClassDef) and any("Unpickler" in ast.unparse(b) for b in node.bases):
                unpicklers.append(f"{path.relative_to(REPO)}:{node.name}")
    assert offenders == [], offenders
    assert unpicklers == [], unpicklers
    assert not re.search(r"^import pickle$", (REPO / "epd_core" / "tables" / "torch_storage.py").read_text(), re.M)


def test_a_valid_predictor_converts_identically_in_the_isolated_converter(tmp_path):
    tables = random_tables(seed=7)
    data = official_pickle(tables)
    here = import_official_bytes(data, source="p.pkl")
    there = import_official_isolated(data, source="p.pkl")
    assert all(torch.equal(a, b) for a, b in zip(here.tensors(), there.tensors()))
    assert torch.equal(there.theta_r, tables["r_params"])
    assert {**here.metadata, "num_steps": here.num_steps, "num_points": here.num_points} == there.metadata


def test_the_isolated_converter_passes_the_importers_own_errors_through():
    with pytest.raises(EPDImportError) as err:
        import_official_isolated(hostile_pickles.deep_tuple_key(), source="deep.pkl")
    assert str(err.value).startswith("deep.pkl: refused") and "nesting depth 32" in str(err.value)


def test_the_isolated_converters_budgets_turn_a_timeout_or_a_crash_into_a_refusal(monkeypatch):
    data = official_pickle()
    with pytest.raises(EPDImportError, match=r"p\.pkl: refused: converting the file took longer than 0\.01 s"):
        import_official_isolated(data, source="p.pkl", timeout=0.01)  # a child cannot even start in 10 ms
    # a real crash of the child (what a parser gap such as a deep recursion would cause)
    monkeypatch.setattr(imp, "_CHILD_SCRIPT", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    with pytest.raises(EPDImportError) as err:
        import_official_isolated(data, source="p.pkl")
    assert "p.pkl: refused: the isolated converter died (signal SIGSEGV" in str(err.value), str(err.value)
    assert "a crash costs the import, not the server" in str(err.value)


@pytest.mark.parametrize("payload", ["deep_tuple_key", "storage_deep_tuple_zip"])
def test_the_isolated_child_refuses_a_hostile_file_before_it_imports_torch(payload):
    """A refusal costs the child's Python start-up, not torch's (~2 s): the parse is torch-free
    (epd_core/tables/predictor_pickle.py and torch_storage.py), and torch is imported only for a file that passed."""
    data = (hostile_pickles.deep_tuple_key() if payload == "deep_tuple_key"
            else hostile_pickles.storage_call(hostile_pickles.STORAGE_ATTACKS["deep tuple key (zip data.pkl)"][0]()))
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from epd_core.tables.import_child import main\n"
              "code = main(['bad.pkl', 'bad.pkl', str(512 << 20)])\n"
              "print('EXIT', code, 'torch' in sys.modules, 'epd_core.tables.params' in sys.modules, file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(REPO)], input=data, capture_output=True, timeout=300)
    stderr = proc.stderr.decode()
    assert proc.returncode == 0 and proc.stdout == b"", stderr[-2000:]
    assert "EXIT 2 False False" in stderr, stderr[-2000:]
    assert "@@epd-import-error@@" in stderr and "bad.pkl: refused" in stderr


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="RLIMIT_AS is set from /proc (Linux)")
def test_the_isolated_converters_address_space_limit_holds():
    script = ("import sys; sys.path.insert(0, sys.argv[1])\n"
              "from epd_core.tables.import_child import limit_address_space\n"
              "assert limit_address_space(64 << 20)\n"
              "try:\n    bytearray(512 << 20)\nexcept MemoryError:\n    print('REFUSED')\n")
    proc = subprocess.run([sys.executable, "-c", script, str(REPO)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "REFUSED", proc.stderr[-2000:]
    assert signal.SIGSEGV  # the module is used by the crash test above


@pytest.mark.parametrize("title", STORAGE_ATTACKS)
def test_hostile_reward_weight_files_are_refused_without_torch_load(tmp_path, title):
    from epd_core.training.rl.rewards import RewardUnavailableError, _load_state_dict
    build, words = hostile_pickles.STORAGE_ATTACKS[title]
    path = tmp_path / "head.pt"
    path.write_bytes(build())
    errors = []

    def refuse():
        with pytest.raises(RewardUnavailableError) as err:
            _load_state_dict("aesthetic", path)
        errors.append(str(err.value))
    assert peak_growth_mb(refuse) < MAX_GROWTH_MB  # was: a 300 kB deep tuple .pt killed the process (SIGSEGV)
    msg = errors[0]
    assert "head.pt" in msg and "never pickled objects" in msg and "save_file" in msg, msg


def _legacy(numel: int, count: int, data: bytes, keys=("0",)) -> bytes:
    """torch's legacy layout of one FloatStorage, with the element counts and data given (hand-made)."""
    h = hostile_pickles
    pid = (b"\x80\x02(" + h.binunicode("storage") + h.global_("torch", "FloatStorage") + h.binunicode("0")
           + h.binunicode("cpu") + b"J" + numel.to_bytes(4, "little") + b"Nt" + b"Q.")
    import pickle
    return h.legacy_prefix(3) + pid + pickle.dumps(list(keys), protocol=2) + count.to_bytes(8, "little") + data


def _zip_storage(numel: int, entry: bytes, compression=None) -> bytes:
    h = hostile_pickles
    pkl = (b"\x80\x02(" + h.binunicode("storage") + h.global_("torch", "FloatStorage") + h.binunicode("0")
           + h.binunicode("cpu") + b"J" + numel.to_bytes(4, "little") + b"tQ.")
    data = h.torch_zip(pkl, {"data/0": entry})
    if compression is not None:
        import zipfile
        buf = io.BytesIO()
        with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(buf, "w", compression) as dst:
            for info in src.infolist():
                dst.writestr(info.filename, src.read(info))
        data = buf.getvalue()
    return data


@pytest.mark.parametrize("data,words", [
    (_legacy(10 ** 9, 10 ** 9, bytes(16)), "claims 1000000000 elements (4000000000 bytes), more than the file's"),
    (_legacy(4, 5, bytes(20)), "claims 4 elements, its data header 5"),
    (_legacy(4, 4, bytes(12)), "claims 4 elements, its data header 4, and 12 bytes are left"),
    (_legacy(4, 4, bytes(17)), "1 unexpected bytes follow the last storage's data"),
    (_legacy(4, 4, bytes(16), keys=("1",)), "lists the storage keys"),
    (_zip_storage(4, bytes(8)), "claims 4 elements (16 bytes), its entry holds 8 bytes"),
    (_zip_storage(10 ** 9, bytes(16)), "claims 1000000000 elements"),
    (_zip_storage(4, bytes(16), compression=8), "is compressed"),  # zipfile.ZIP_DEFLATED
])
def test_storage_layout_errors_are_refused_with_the_problem_named(data, words):
    from epd_core.tables.torch_storage import TorchFileError, read_storage
    with pytest.raises(TorchFileError) as err:
        read_storage(data)
    assert words in str(err.value), str(err.value)


def test_the_hand_made_storages_are_valid_when_consistent():
    from epd_core.tables.torch_storage import read_storage
    values = torch.arange(4, dtype=torch.float32)
    raw = values.numpy().tobytes()
    assert torch.equal(read_storage(_legacy(4, 4, raw)), values)
    assert torch.equal(read_storage(_zip_storage(4, raw)), values)


def _fuzz_bases() -> dict:
    values = torch.arange(6, dtype=torch.float32)
    sd = {"a.weight": torch.randn(3, 2), "a.bias": torch.zeros(3), "n": {"x": values[1:4]}}
    out = {}
    for zip_format in (False, True):
        for name, obj in (("storage", values._typed_storage()), ("state_dict", sd)):
            buf = io.BytesIO()
            torch.save(obj, buf, _use_new_zipfile_serialization=zip_format)
            out[(name, zip_format)] = buf.getvalue()
    return out


FUZZ_BASES = _fuzz_bases()


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=st.sampled_from(sorted(FUZZ_BASES)), cut=st.one_of(st.none(), st.integers(0, 2000)),
       edits=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=4))
@example(base=("storage", True), cut=None, edits=[(1163, 1)])   # a zip entry flagged encrypted (found by this test)
@example(base=("storage", True), cut=None, edits=[(1163, 32)])  # flagged "compressed patched data"
def test_fuzzed_torch_files_fail_cleanly(base, cut, edits):
    """Truncated or byte-edited storages and state dicts in both layouts: a result or a TorchFileError, nothing
    else (no other exception type, no crash)."""
    import tempfile
    from epd_core.tables.torch_storage import TorchFileError, read_state_dict, read_storage
    data = bytearray(FUZZ_BASES[base])
    for pos, value in edits:
        data[pos % len(data)] = value
    data = bytes(data[:cut] if cut is not None else data)
    try:
        if base[0] == "storage":
            read_storage(data)
        else:
            with tempfile.NamedTemporaryFile(suffix=".pt") as f:
                f.write(data)
                f.flush()
                read_state_dict(f.name)
    except TorchFileError:
        pass

