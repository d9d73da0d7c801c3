"""Security review regressions (issue 14) that need no server: hostile predictor pickles (memory bomb through
shared references, huge integers, BUILD on the OrderedDict stand-in, oversized names), hostile table files
(deeply nested JSON), and the preview's cap on what it draws. The attacks through a real ComfyUI server are in
tests/test_security_server.py."""
import io
import json
import resource
import struct
import sys
import time
from pathlib import Path

import pytest
import torch

from epd_core.import_official import EPDImportError, import_official_bytes
from epd_core.params import MAX_METADATA_DEPTH, EPDParams, EPDParamsError
from official_pickle import FakeGlobal, official_pickle, random_tables, sd15_attrs

REPO = Path(__file__).resolve().parents[1]


def shared_list_bomb(width: int, depth: int):
    """`width` references to ONE list, nested `depth` deep: pickle memoises the shared list, so the file stays
    a few kB while a naive recursive copy visits width**depth nodes."""
    inner = []
    for _ in range(depth):
        inner = [inner] * width
    return inner


def timed_import(data: bytes, limit_s: float = 2.0):
    start = time.monotonic()
    try:
        return import_official_bytes(data, source="bomb.pkl")
    finally:
        assert time.monotonic() - start < limit_s, "the importer must refuse or finish in milliseconds"


# ---- item 1: memory bomb in the predictor importer ---------------------------------------------------------
@pytest.mark.parametrize("depth", [3, 6])
def test_shared_reference_bomb_in_M_is_refused_in_milliseconds(tmp_path, depth):
    data = official_pickle(attrs=sd15_attrs(M=shared_list_bomb(64, depth)))
    assert len(data) < 8000  # a small file ...
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(EPDImportError) as err:
        timed_import(data)  # ... that the old plain-data copy expanded to 64**depth nodes (depth 6: MemoryError)
    msg = str(err.value)
    assert msg.startswith("bomb.pkl: refused") and "'M'" in msg and "nothing was written" in msg
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 200 * 1024  # kB: no big allocation


def test_bomb_through_the_cli_writes_nothing(tmp_path):
    import subprocess
    src = tmp_path / "bomb.pkl"
    src.write_bytes(official_pickle(attrs=sd15_attrs(backend_config={"a": shared_list_bomb(64, 6)})))
    out = tmp_path / "out.safetensors"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "epd_core.import_official", str(src), str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "refused" in proc.stderr and "'backend_config'" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()
    assert time.monotonic() - start < 60


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
    from official_pickle import OfficialPickler, persistent_model, predictor_state
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
    data = official_pickle(attrs=sd15_attrs(backend=None, dataset_name="a" * 3_000_000))
    with pytest.raises(EPDImportError) as err:  # was: imported, then the saved file could not be loaded
        timed_import(data)
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
