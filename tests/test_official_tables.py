"""Official tables by name (issue 16, item 4): `--official NAME` and the Import node's 'official: NAME' choices
download the authors' published predictor, check its size and SHA-256 before anything is unpickled, and convert
it; offline, the error gives the URL to fetch by hand and the command that converts the fetched file.

The real files cannot be downloaded here, so a local HTTP server on 127.0.0.1 serves official-style fixture
pickles (bench/official_pickle.py) under the authors' paths, and each test makes its fixture's SHA-256 the
expected one for a name (in this process by monkeypatching OFFICIAL_FILES; in the ComfyUI server through a
tiny custom node written into its base folder). The base URL reaches the server through EPD_OFFICIAL_BASE_URL."""
import contextlib
import hashlib
import http.server
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import epd_core.tables.import_official as imp
from epd_core.tables.formats import FORMATS
from bench.comfyui_server import COMFYUI, REPO, ComfyServer, error_message, free_port
from epd_core.tables.import_official import EPDImportError, OfficialFile, import_official_bytes
from epd_core.tables.params import EPDParams
from bench.official_pickle import official_pickle, old_branch_pickle, random_tables, sd15_attrs

REAL_BASE = "https://raw.githubusercontent.com/BeierZhu/EPD/88a91f0914069afd700bfee1b590c7b61ceae240"
SD15_TABLES = random_tables(seed=21)
FLUX_TABLES = random_tables(num_steps=7, num_points=3, seed=22)
FIXTURES = {
    "sd15-best": official_pickle(SD15_TABLES),
    "flux-best": official_pickle(FLUX_TABLES, sd15_attrs(
        num_steps=7, num_points=3, schedule_type="flowmatch", guidance_rate=3.5, backend="flux",
        backend_config={"resolution": 1024, "shift": 3.0}, dataset_name="ms_coco")),
}


def fixture_entry(name: str, data: bytes | None = None) -> OfficialFile:
    data = FIXTURES[name] if data is None else data
    return OfficialFile(name, len(data), hashlib.sha256(data).hexdigest())


class FileServer:
    """http.server on 127.0.0.1 in a thread, serving {url path: bytes}; records every GET path."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.requests = dict(files), []
        self.redirects: dict[str, str] = {}  # url path -> Location of a 302
        self.drip: dict[str, float] = {}     # url path -> seconds between single bytes (a hostile slow mirror)
        self.dripped: dict[str, int] = {}    # url path -> bytes written so far at that rate
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append(self.path)
                if self.path in outer.redirects:
                    self.send_response(302)
                    self.send_header("Location", outer.redirects[self.path])
                    self.end_headers()
                    return
                data = outer.files.get(self.path)
                if self.path in outer.drip and data is not None:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    try:
                        for i in range(len(data)):
                            self.wfile.write(data[i:i + 1])
                            self.wfile.flush()
                            outer.dripped[self.path] = i + 1
                            time.sleep(outer.drip[self.path])
                    except OSError:  # the client gave up
                        pass
                    return
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # quiet
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def serve(self, name: str, data: bytes) -> None:
        self.files[f"/{imp.official_file(name).path}"] = data

    def count(self, name: str) -> int:
        return self.requests.count(f"/{imp.official_file(name).path}")

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@contextlib.contextmanager
def file_server(files=None):
    server = FileServer({})
    for name, data in (FIXTURES if files is None else files).items():
        server.serve(name, data)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def served(monkeypatch):
    """The fixtures served under the authors' paths, with their hashes as the expected ones."""
    with file_server() as server:
        for name in FIXTURES:
            monkeypatch.setitem(imp.OFFICIAL_FILES, name, fixture_entry(name))
        monkeypatch.setenv(imp.BASE_URL_ENV, server.url)
        yield server


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # bound and released: nothing listens there


# ---- names, paths, URLs -------------------------------------------------------------------------------
def test_names_paths_and_urls_follow_the_authors_repository(monkeypatch):
    monkeypatch.delenv(imp.BASE_URL_ENV, raising=False)
    others = [entry[0] for fmt in FORMATS for entry in fmt.PUBLISHED]  # other formats' files: their own tests
    assert list(imp.OFFICIAL_FILES) == [
        "flux-best", "flux-start", "sd15-best", "sd15-distilled", "sd15-start", "sd3-1024-best",
        "sd3-1024-distilled", "sd3-1024-start", "sd3-512-best", "sd3-512-distilled", "sd3-512-start", *others]
    epd = [f for f in imp.OFFICIAL_FILES.values() if f.name not in others]
    assert all(7000 < f.size < 8000 and len(f.sha256) == 64 for f in epd)
    assert imp.official_file("sd15-best").sha256 == "2e14a48e6b28944091b49d7cb3f0aa009bafad8668888fa584b09da5205ba227"
    # the layout of the authors' README (exps/<family>/<name>.pkl; flux files seen in the repository itself)
    assert imp.official_url("sd15-best") == f"{REAL_BASE}/exps/sd15/sd15-best.pkl"
    assert imp.official_url("flux-start") == f"{REAL_BASE}/exps/flux/flux-start.pkl"
    assert imp.official_url("sd3-1024-distilled") == f"{REAL_BASE}/exps/sd3-1024/sd3-1024-distilled.pkl"
    assert imp.official_url("sd3-512-best") == f"{REAL_BASE}/exps/sd3-512/sd3-512-best.pkl"
    assert imp.official_url("sd15-best", "http://mirror/x/") == "http://mirror/x/exps/sd15/sd15-best.pkl"
    monkeypatch.setenv(imp.BASE_URL_ENV, "http://127.0.0.1:9")
    assert imp.official_url("sd15-best") == "http://127.0.0.1:9/exps/sd15/sd15-best.pkl"
    with pytest.raises(EPDImportError, match="not a published EPD predictor. Known names: flux-best"):
        imp.official_file("sd15-bestest")


# ---- command line -------------------------------------------------------------------------------------
def test_cli_official_downloads_verifies_and_converts(served, tmp_path, capsys):
    out = tmp_path / "sd15.safetensors"
    assert imp.main(["--official", "sd15-best", str(out)]) == 0, capsys.readouterr().err
    assert f"wrote {out}" in capsys.readouterr().out
    params = EPDParams.load(out)
    for ours, theirs in zip(params.tensors(), ("r_params", "weight_s", "scale_dir_params", "scale_time_params")):
        assert torch.equal(ours, SD15_TABLES[theirs])
    prov = params.metadata["provenance"]
    assert prov["official_name"] == "sd15-best" and prov["official_url"] == f"{REAL_BASE}/exps/sd15/sd15-best.pkl"
    assert prov["sha256"] == hashlib.sha256(FIXTURES["sd15-best"]).hexdigest()
    assert params.metadata["model_family"] == "sd15"
    assert served.requests == ["/exps/sd15/sd15-best.pkl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sd15.safetensors"]  # no temp or .pkl left behind

    flux = tmp_path / "flux.safetensors"
    assert imp.main(["--official", "flux-best", str(flux)]) == 0
    assert EPDParams.load(flux).metadata["model_family"] == "flux"
    assert torch.equal(EPDParams.load(flux).theta_r, FLUX_TABLES["r_params"])


def test_wrong_hash_is_refused_before_unpickling_and_nothing_is_written(served, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()  # would run a command if it were ever unpickled
    for data in (evil, FIXTURES["sd15-best"][:-1], FIXTURES["sd15-best"][:-2] + b"X."):  # bad, cut, altered
        served.serve("sd15-best", data)
        out = tmp_path / "sd15.safetensors"
        assert imp.main(["--official", "sd15-best", str(out)]) == 2
        err = capsys.readouterr().err
        assert "refused: this is not the published 'sd15-best' predictor" in err, err
        assert imp.official_file("sd15-best").sha256 in err and hashlib.sha256(data).hexdigest() in err
        assert "Nothing was unpickled or written" in err and "Traceback" not in err
        assert list(tmp_path.iterdir()) == [] and not marker.exists()
    with pytest.raises(EPDImportError, match="SHA-256"):
        imp.download_official("sd15-best")


def test_oversized_downloads_are_refused(served, tmp_path):
    served.serve("sd15-best", b"\x80\x04" + b"N" * (imp.MAX_DOWNLOAD_BYTES + 10))
    with pytest.raises(EPDImportError, match="far more than an EPD predictor"):
        imp.download_official("sd15-best")


def test_offline_error_gives_the_url_and_the_command(tmp_path, monkeypatch, capsys):
    out = tmp_path / "sd15.safetensors"
    env = {**os.environ, imp.BASE_URL_ENV: closed_port_url(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "epd_core.import_official", "--official", "sd15-best", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    err = proc.stderr
    assert err.startswith("error: cannot download the official predictor 'sd15-best' from http://127.0.0.1:")
    assert f"fetch {REAL_BASE}/exps/sd15/sd15-best.pkl by hand (7177 bytes, SHA-256 2e14a48e" in err
    command = f"python -m epd_core.import_official --official sd15-best sd15-best.pkl {out}"
    assert err.rstrip().endswith(f"convert it with: {command}"), err
    assert list(tmp_path.iterdir()) == []

    # following the message: the file fetched by hand (here the fixture, whose hash is made the expected one)
    monkeypatch.setitem(imp.OFFICIAL_FILES, "sd15-best", fixture_entry("sd15-best"))
    monkeypatch.chdir(tmp_path)
    Path("sd15-best.pkl").write_bytes(FIXTURES["sd15-best"])
    assert imp.main(shlex.split(command)[3:]) == 0, capsys.readouterr().err
    assert torch.equal(EPDParams.load(out).theta_w, SD15_TABLES["weight_s"])
    # a wrong file fetched by hand is refused the same way as a wrong download
    Path("sd15-best.pkl").write_bytes(FIXTURES["flux-best"])
    out.unlink()
    assert imp.main(shlex.split(command)[3:]) == 2
    assert "not the published 'sd15-best' predictor" in capsys.readouterr().err and not out.exists()


def test_http_errors_and_bad_base_urls_are_clear(served, monkeypatch):
    with pytest.raises(EPDImportError, match=r"HTTP 404 .*fetch https://raw\.githubusercontent\.com/BeierZhu/EPD/"
                                             r"88a91f0914069afd700bfee1b590c7b61ceae240/exps/sd15/sd15-start\.pkl "
                                             r"by hand.*--official sd15-start sd15-start\.pkl"):
        imp.download_official("sd15-start")  # not served
    monkeypatch.setenv(imp.BASE_URL_ENV, "file:///etc")
    with pytest.raises(EPDImportError, match="only http"):
        imp.download_official("sd15-best")


# ---- issue 21, item 2: an overall deadline, Cancel, https-only redirects ----------------------------------
def test_a_trickling_mirror_is_cut_off_at_the_overall_deadline(served):
    path = f"/{imp.official_file('sd15-best').path}"
    served.drip[path] = 0.2  # a byte every 0.2 s: 7177 bytes in 24 min
    with pytest.raises(EPDImportError, match="the download took longer than 1.5 s"):
        imp.download_official("sd15-best", timeout=1.5)  # was: kept reading, each byte within the socket timeout
    assert served.dripped[path] < imp.official_file("sd15-best").size  # stopped by the deadline, not the end


def test_should_stop_cancels_a_download_at_once(served):
    path = f"/{imp.official_file('sd15-best').path}"
    served.drip[path] = 0.2
    polls = []
    with pytest.raises(imp.DownloadCancelled, match="cancelled; nothing was written"):
        imp.download_official("sd15-best", should_stop=lambda: polls.append(1) or len(polls) > 3)
    assert len(polls) == 4  # the first True stops it
    assert served.dripped.get(path, 0) < imp.official_file("sd15-best").size


@pytest.mark.parametrize("target", ["ftp://127.0.0.1:9/x.pkl", "file:///etc/passwd", "/exps/sd15/sd15-best.pkl",
                                    "http://127.0.0.1:9/x.pkl"])
def test_redirects_are_followed_only_to_https(served, target):
    served.redirects[f"/{imp.official_file('sd15-start').path}"] = target  # was: ftp:// followed
    with pytest.raises(EPDImportError) as err:
        imp.download_official("sd15-start")
    msg = str(err.value)
    assert "refused: the server redirects to" in msg and "only redirects to https URLs are followed" in msg, msg


# ---- the authors' older branch ------------------------------------------------------------------------
def test_older_branch_files_say_what_they_are(tmp_path, capsys):
    with pytest.raises(EPDImportError) as e:
        import_official_bytes(old_branch_pickle(), source="cifar10-epd.pkl")
    msg = str(e.value)
    assert msg.startswith("cifar10-epd.pkl: this is a predictor from the EPD authors' older EPD-Solver branch")
    assert "EDM pixel-space models such as CIFAR-10" in msg and "'solvers.epd_sampler'" in msg
    assert "no ComfyUI model uses those predictors" in msg and "Nothing in it was run" in msg
    assert "never contains" not in msg and "tampered" not in msg
    assert "solvers" not in sys.modules  # recognised by name, never imported
    src = tmp_path / "cifar10-epd.pkl"
    src.write_bytes(old_branch_pickle())
    assert imp.main([str(src), str(tmp_path / "out.safetensors")]) == 2
    assert "older EPD-Solver branch" in capsys.readouterr().err and not (tmp_path / "out.safetensors").exists()


# ---- the Import node in a real ComfyUI server ---------------------------------------------------------
HASH_PATCH_NODE = """# test only: the fixtures' SHA-256 become the expected ones (by tests/test_official_tables.py)
import sys
if {repo!r} not in sys.path:
    sys.path.append({repo!r})
import epd_core.tables.import_official as imp
for name, entry in {entries!r}.items():
    imp.OFFICIAL_FILES[name] = imp.OfficialFile(name, *entry)
NODE_CLASS_MAPPINGS = {{}}
"""


@pytest.fixture(scope="module")
def official_server(tmp_path_factory):
    if not (COMFYUI / "main.py").exists():
        pytest.skip("no ComfyUI runtime (run scripts/setup_runtime.sh)")
    with file_server() as files:
        base = tmp_path_factory.mktemp("official_base")
        server = ComfyServer(base, with_test_nodes=False, env={imp.BASE_URL_ENV: files.url})
        patch = base / "custom_nodes" / "epd_official_fixture_hashes"
        patch.mkdir()
        entries = {name: tuple(fixture_entry(name))[1:] for name in FIXTURES}
        entries["flux-best"] = (123, "0" * 64)  # served, but never the expected file: a wrong hash
        (patch / "__init__.py").write_text(HASH_PATCH_NODE.format(repo=str(REPO), entries=entries))
        server.start()
        try:
            yield server, files
        finally:
            server.stop()


def import_graph(predictor, output_name=""):
    return {"imp": {"class_type": "EPDImportPredictor", "inputs": {
        "predictor": predictor, "output_name": output_name, "overwrite": False, "pkl_path": ""}}}


def run(server, graph):
    entry = server.run(graph, timeout=120)
    return entry["status"]["status_str"], error_message(entry)


@pytest.mark.server
def test_node_downloads_once_and_reuses_the_cached_copy(official_server):
    server, files = official_server
    options = server.object_info()["EPDImportPredictor"]["input"]["required"]["predictor"][1]["options"]
    assert options[0] == "(no .pkl in models/epd_params)"  # the existing choice keeps working
    assert options[1:] == [f"official: {name}" for name in imp.OFFICIAL_FILES]
    models = server.base / "models" / "epd_params"
    cache = models / "official" / "sd15-best.pkl"

    status, err = run(server, import_graph("official: sd15-best"))
    assert status == "success", err + server.log_tail()
    assert files.count("sd15-best") == 1 and cache.read_bytes() == FIXTURES["sd15-best"]
    params = EPDParams.load(models / "sd15-best.safetensors")
    assert torch.equal(params.theta_r, SD15_TABLES["r_params"])
    assert params.metadata["provenance"]["official_name"] == "sd15-best"

    # a second run (another output name, so ComfyUI runs the node again) reads the cached copy
    status, err = run(server, import_graph("official: sd15-best", "sd15 again"))
    assert status == "success", err
    assert files.count("sd15-best") == 1
    assert torch.equal(EPDParams.load(models / "sd15 again.safetensors").theta_w, SD15_TABLES["weight_s"])

    # the cached copy is checked too: a damaged one is downloaded again and replaced
    cache.write_bytes(FIXTURES["sd15-best"][:-1])
    status, err = run(server, import_graph("official: sd15-best", "sd15 third"))
    assert status == "success", err
    assert files.count("sd15-best") == 2 and cache.read_bytes() == FIXTURES["sd15-best"]
    assert "is not the published file" in server.log_tail(200)

    # the cached copy does not appear as a local .pkl choice (the combo lists it by name)
    options = server.object_info()["EPDImportPredictor"]["input"]["required"]["predictor"][1]["options"]
    assert "official/sd15-best.pkl" not in options and "official: sd15-best" in options


@pytest.mark.server
def test_node_refuses_a_wrong_hash_and_explains_offline_use(official_server):
    server, files = official_server
    models = server.base / "models" / "epd_params"
    status, err = run(server, import_graph("official: flux-best"))
    assert status == "error" and "refused: this is not the published 'flux-best' predictor" in err, err
    assert "SHA-256 " + "0" * 64 in err and "Nothing was unpickled or written" in err
    assert not (models / "flux-best.safetensors").exists() and not (models / "official" / "flux-best.pkl").exists()

    status, err = run(server, import_graph("official: sd3-512-best"))  # not served: as good as offline
    assert status == "error" and files.count("sd3-512-best") == 1
    assert "cannot download the official predictor 'sd3-512-best'" in err and "HTTP 404" in err, err
    assert f"fetch {REAL_BASE}/exps/sd3-512/sd3-512-best.pkl by hand" in err
    assert ("python -m epd_core.import_official --official sd3-512-best sd3-512-best.pkl "
            "models/epd_params/sd3-512-best.safetensors") in err
    assert "put the fetched file at models/epd_params/official/sd3-512-best.pkl" in err
    assert str(server.base) not in err and str(REPO) not in err  # no server folders in a client's error
    assert not (models / "sd3-512-best.safetensors").exists()


@pytest.mark.server
def test_cancel_stops_a_trickling_download_and_the_next_prompt_runs(official_server):
    server, files = official_server
    path = f"/{imp.official_file('sd3-1024-best').path}"
    files.files[path], files.drip[path] = FIXTURES["sd15-best"], 0.2  # 24 min at this rate, far past any deadline
    sent = []

    def cancel_when_it_runs(msg):
        if msg["type"] == "executing" and msg.get("data", {}).get("node") == "imp" and not sent:
            sent.append(True)
            threading.Timer(1.0, server.interrupt).start()
    entry = server.run(import_graph("official: sd3-1024-best"), timeout=120, on_message=cancel_when_it_runs)
    kinds = [kind for kind, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds, entry["status"]  # was: ran on past Cancel, the next prompt waited
    assert sent and files.dripped.get(path, 0) < len(FIXTURES["sd15-best"])  # stopped by Cancel, not the end
    models = server.base / "models" / "epd_params"
    assert not (models / "sd3-1024-best.safetensors").exists() and not (models / "official" / "sd3-1024-best.pkl"
                                                                          ).exists()
    status, err = run(server, import_graph("official: sd15-best", "after cancel"))  # the server takes the next one
    assert status == "success", err
