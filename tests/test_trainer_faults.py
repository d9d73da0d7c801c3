"""Trainer faults with real processes: SIGKILL in the middle of checkpoint / table writes, SIGKILL of the
distillation CLI and --resume, an output folder that cannot be written, and two trainers writing the same
output name at once. Every file under its final name is always one complete file from one writer."""
import json
import os
import platform
import random
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from epd_core.training import distill as D
from epd_core.demo.gmm import GaussianMixtureDenoiser
from epd_core.tables.params import EPDParams, atomic_write_bytes

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS)]))

# ============================================================================ (a) SIGKILL during file writes
# A writer process alternates two real writers on the same folder: version v even -> a distillation checkpoint
# (D.save_checkpoint, 1.2-1.8 MB: a long loss history, so the write + fsync window is wide), v odd -> a
# parameter table (EPDParams.save). Each version's content is derived from v, so a file that mixes two
# versions, or is cut short, cannot pass the checks below.
CKPT_NAME, TABLE_NAME = "run.distill-checkpoint", "table.safetensors"
RESUME_CFG = dict(sigmas=[80.0, 8.0, 0.8, 0.08, 0.0], iterations=6, batch=4, num_batches=1, checkpoint_interval=1)
SAVED_AT = 5  # the iteration in every written checkpoint: resuming one runs the last iteration
THETA_NAMES = ("theta_r", "theta_w", "theta_c", "theta_a")
KILLS, MID_WRITE, MAX_KILLS = 20, 5, 100  # at least 20 kills, and on until 5 of them landed inside a write


def loss_len(v: int) -> int:
    return 150_000 + (v % 5) * 20_000


def table_version(v: int) -> EPDParams:
    return EPDParams.from_values(torch.full((3, 2), (v % 89 + 1) / 100), torch.full((3, 2), 0.5),
                                 provenance={"version": v})


def write_version(folder: Path, v: int, theta, optimizer, cfg) -> None:
    if v % 2 == 0:
        with torch.no_grad():
            for t in theta:
                t.fill_(v / 1000)
        D.save_checkpoint(folder / CKPT_NAME, theta, optimizer, SAVED_AT, [float(v)] * loss_len(v), cfg, (0.05, 0.0))
    else:
        table_version(v).save(folder / TABLE_NAME)


def version_on_disk(folder: Path, name: str):
    """The version in the file under its final name (None if there is none); raises if it is damaged."""
    path = folder / name
    if not path.exists():
        return None
    if name == CKPT_NAME:
        ck = D.load_checkpoint(path)  # DistillError on a torn or truncated file
        v = int(ck["losses"][0])
        assert ck["iteration"] == SAVED_AT and ck["losses"] == [float(v)] * loss_len(v), f"checkpoint v{v} mixed"
        assert all(torch.all(ck["tensors"][n] == v / 1000) for n in THETA_NAMES), f"checkpoint v{v} mixed"
        return v
    table = EPDParams.load(path)  # EPDParamsError on a torn or truncated file
    v = table.metadata["provenance"]["version"]
    assert all(torch.equal(a, b) for a, b in zip(table.tensors(), table_version(v).tensors())), f"table v{v} mixed"
    return v


def writer_main(folder: str) -> None:
    """Runs in a subprocess: imports once, then for every line `start` on stdin forks a child that writes
    versions start, start+1, ... until it is SIGKILLed, printing `done v` after each completed write."""
    torch.set_num_threads(1)
    folder = Path(folder)
    cfg = D.DistillConfig(**RESUME_CFG)
    theta = [torch.zeros(3, 2, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    optimizer = torch.optim.Adam(theta)
    sum(t.sum() for t in theta).backward()
    optimizer.step()  # real Adam moments in the checkpoints
    print("ready", flush=True)
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            try:
                v = int(line)
                while True:
                    write_version(folder, v, theta, optimizer, cfg)
                    os.write(1, f"done {v}\n".encode())
                    v += 1
            except BaseException as e:  # noqa: BLE001 - report, never fall back into the parent's loop
                os.write(1, f"error {e!r}\n".encode())
            finally:
                os._exit(1)
        print(f"child {pid}", flush=True)
        os.waitpid(pid, 0)
        print("reaped", flush=True)


def test_sigkill_during_checkpoint_and_table_writes(tmp_path):
    folder = tmp_path / "w"
    folder.mkdir()
    code = f"import test_trainer_faults as T; T.writer_main({str(folder)!r})"
    writer = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=ENV, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, bufsize=1)
    rng = random.Random(1234)
    done = {CKPT_NAME: None, TABLE_NAME: None}  # last version reported complete, per file
    name_of = {0: CKPT_NAME, 1: TABLE_NAME}
    start, temps_seen, mid_write, unreported, writes, kills = 0, set(), 0, 0, 0, 0
    try:
        assert writer.stdout.readline().strip() == "ready"
        while kills < KILLS or (mid_write < MID_WRITE and kills < MAX_KILLS):
            kills += 1
            writer.stdin.write(f"{start}\n")
            writer.stdin.flush()
            lines = []
            while not (line := writer.stdout.readline()).startswith("child"):
                lines.append(line)
            time.sleep(rng.uniform(0.0, 0.2))
            os.kill(int(line.split()[1]), signal.SIGKILL)
            while not (line := writer.stdout.readline()).startswith("reaped"):
                assert line, "writer process died"
                lines.append(line)
            last = start - 1
            for line in lines:
                assert line.startswith("done"), line
                last = int(line.split()[1])
                done[name_of[last % 2]] = last
                writes += 1
            # killed while writing version last + 1 (or just before / just after its rename)
            for name in done:
                on_disk = version_on_disk(folder, name)
                allowed = {done[name], last + 1} if name == name_of[(last + 1) % 2] else {done[name]}
                assert on_disk in allowed, f"{name}: version {on_disk} on disk, expected one of {allowed}"
                unreported += on_disk == last + 1 and on_disk != done[name]
                done[name] = on_disk  # completed, even if the kill came before it was reported
            temps = {p.name for p in folder.iterdir() if p.name.endswith(".tmp")}
            mid_write += bool(temps - temps_seen)
            temps_seen |= temps
            start = last + 2 + rng.randrange(2)  # skip last + 1 (it may be on disk); either file first
    finally:
        writer.kill()
        writer.wait()
    assert all(n.startswith(".") and (n.startswith(f".{CKPT_NAME}.") or n.startswith(f".{TABLE_NAME}."))
               for n in temps_seen)  # hidden, never '*.safetensors': Load EPD Params does not list them
    assert mid_write >= MID_WRITE, f"only {mid_write} of {kills} kills landed inside a write"
    assert done[CKPT_NAME] is not None and done[TABLE_NAME] is not None

    # the temp files left by the killed writers break neither a resume nor the next save
    gmm = GaussianMixtureDenoiser(dim=8, seed=0)
    saved = D.load_checkpoint(folder / CKPT_NAME)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        table = D.distill(gmm, None, lambda g, n: 80 * torch.randn(n, 8, generator=g, dtype=torch.float64),
                          D.DistillConfig(**RESUME_CFG, checkpoint_path=str(folder / CKPT_NAME), resume=True))
    finally:
        torch.set_num_threads(old_threads)
    resumed = D.load_checkpoint(folder / CKPT_NAME)
    assert resumed["iteration"] == RESUME_CFG["iterations"] and resumed["losses"][:-1] == saved["losses"]
    table.save(folder / TABLE_NAME)
    assert torch.equal(EPDParams.load(folder / TABLE_NAME).theta_r, table.theta_r)
    print(f"\nSIGKILL during writes: {kills} kills survived after {writes} completed writes; {mid_write} landed "
          f"inside a write (temp file left, {len(temps_seen)} in all, harmless: the resume and the next save "
          f"worked beside them), {unreported} just after a rename; every final-name file complete")


# ====================================================== temp names must be unique across PID namespaces
NS_WRITER = """
import json, os, sys, time
from pathlib import Path
import torch
from epd_core.tables.params import EPDParams, EPDParamsError
target, who, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
table = EPDParams.from_values(torch.full((3, 2), 0.1 * who), torch.full((3, 2), 0.5))
Path(f"{target}.ready{who}").touch()
deadline = time.time() + 120
while not all(Path(f"{target}.ready{w}").exists() for w in (1, 2)) and time.time() < deadline:
    time.sleep(0.001)
errors, saves, end = [], 0, time.time() + seconds
while time.time() < end:
    try:
        table.save(target)
        saves += 1
    except EPDParamsError as e:
        errors.append(str(e))
print(json.dumps({"pid": os.getpid(), "saves": saves, "errors": len(errors), "first": errors[:1]}), flush=True)
"""  # pid 1 of its own PID namespace: once both are ready, saves a table of `who` to `target` for `seconds`


def _namespaces_available() -> bool:
    if platform.system() != "Linux" or not (shutil.which("unshare") and shutil.which("setarch")):
        return False
    try:
        return subprocess.run(["unshare", "--pid", "--fork", "setarch", platform.machine(), "-R", "true"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _namespaces_available(), reason="needs unshare --pid and setarch -R (Linux, root)")
def test_two_writers_with_the_same_pid_do_not_share_a_temp_file(tmp_path):
    """Two ComfyUI containers sharing a models folder both run as pid 1 (or the same small pid). With address
    randomisation off their heaps are identical too, so a temp name made of pid + id(data) was the same in both:
    one writer renamed the other's half-written temp file away ('cannot write (No such file or directory)')."""
    target = tmp_path / "shared.safetensors"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ENV["PYTHONPATH"]}
    procs = [subprocess.Popen(["unshare", "--pid", "--fork", "setarch", platform.machine(), "-R", sys.executable,
                               "-c", NS_WRITER, str(target), str(who), "1.5"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for who in (1, 2)]
    reads = 0
    while any(p.poll() is None for p in procs):
        if target.exists():
            table = EPDParams.load(target)
            assert torch.unique(table.positions).numel() == 1  # one writer's table, never a mix
            reads += 1
        time.sleep(0.002)
    results = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    print(f"\nsame-pid writers: pids {[r['pid'] for r in results]}, saves {[r['saves'] for r in results]}, failed "
          f"{[r['errors'] for r in results]} {results[0]['first'] or results[1]['first']}, "
          f"{reads} concurrent reads all complete")
    assert all(r["errors"] == 0 for r in results), results
    EPDParams.load(target)


def test_the_folder_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    """A power cut after 'saved' must not lose the rename: the folder entry is flushed too (best effort where
    a folder cannot be opened)."""
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        return real_fsync(fd)
    monkeypatch.setattr(os, "fsync", spy)
    atomic_write_bytes(tmp_path / "f.bin", b"data")
    assert synced == [False, True]  # the temp file's data, then the folder after the rename
    assert (tmp_path / "f.bin").read_bytes() == b"data"


# ============================================================================ (b) SIGKILL of the CLI, resume
CLI = [sys.executable, "-m", "epd_core.train", "distill", "--model", "gmm", "--gmm-dim", "16", "--steps", "3",
       "--batch", "8", "--num-batches", "2", "--objective", "per_step+end_to_end", "--solver", "epd_plugin",
       "--checkpoint-interval", "1", "--quiet"]


def cli(*args, iterations=120):
    return [*CLI, "--iterations", str(iterations), *map(str, args)]


def run(cmd, expect=0, timeout=180):
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == expect, f"{' '.join(map(str, cmd))} -> {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def main_in_process(args, capsys=None) -> tuple[int, str]:
    """The CLI's main() in this process (saves a ~3 s interpreter start where no kill is needed); one thread
    like the subprocesses, so float64 results are bit-identical to theirs."""
    from epd_core.training.cli import main
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main([str(a) for a in args[3:]])  # without python -m epd_core.train
    finally:
        torch.set_num_threads(threads)
    return code, capsys.readouterr().err if capsys is not None else ""


def tables_equal(a: Path, b: Path) -> bool:
    return all(torch.equal(x, y) for x, y in zip(EPDParams.load(a).tensors(), EPDParams.load(b).tensors()))


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    ref_out, out = tmp_path / "ref.safetensors", tmp_path / "run.safetensors"
    ckpt = tmp_path / "ck" / "run.distill-checkpoint"
    rng = random.Random(7)
    killed_at = []
    for attempt in range(2):
        args = ["--out", out, "--checkpoint-dir", tmp_path / "ck"] + (["--resume"] if attempt else [])
        before = D.load_checkpoint(ckpt)["iteration"] if ckpt.exists() else 0
        proc = subprocess.Popen(cli(*args), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:  # until this run has written a checkpoint
            if ckpt.exists() and D.load_checkpoint(ckpt)["iteration"] > before:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.5))
        proc.kill()  # SIGKILL
        proc.wait()
        assert proc.returncode in (-signal.SIGKILL, 0), proc.stderr.read()
        killed_at.append(D.load_checkpoint(ckpt)["iteration"] if proc.returncode else "finished")
    temps = [p.name for p in ckpt.parent.iterdir() if p.name.endswith(".tmp")]
    assert main_in_process(cli("--out", out, "--checkpoint-dir", tmp_path / "ck", "--resume"))[0] == 0
    assert main_in_process(cli("--out", ref_out, "--checkpoint-dir", tmp_path / "ck_ref"))[0] == 0  # uninterrupted
    final, final_ref = D.load_checkpoint(ckpt), D.load_checkpoint(tmp_path / "ck_ref" / "ref.distill-checkpoint")
    print(f"\nCLI SIGKILLed with checkpoints at iterations {killed_at} (of 120), {len(temps)} temp file(s) left; "
          f"resumed run == uninterrupted run: table {tables_equal(out, ref_out)}, float64 logits + Adam + losses "
          f"{all(torch.equal(final['tensors'][k], final_ref['tensors'][k]) for k in final['tensors'])}")
    # bit-identical: noise batch j comes from batch_seed(seed, j), Adam's moments and step are checkpointed
    assert tables_equal(out, ref_out)
    assert final["iteration"] == 120 and final["losses"] == final_ref["losses"]
    assert final["tensors"].keys() == final_ref["tensors"].keys()
    assert all(torch.equal(final["tensors"][k], final_ref["tensors"][k]) for k in final["tensors"])


# ============================================================================ (c) unwritable output folder
def _no_dac_override() -> list[str] | None:
    """A command prefix that drops root's permission override (CAP_DAC_OVERRIDE), so folder permissions apply
    as they do to an ordinary user; None where that is not possible."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        return None
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def test_output_folder_under_a_file_is_refused_before_training(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file")
    started = time.time()
    procs = {what: subprocess.Popen(cli(*args), cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
             for what, args in (("out", ["--out", blocker / "sub" / "x.safetensors", "--checkpoint-dir",
                                         tmp_path / "ck"]),
                                ("ckpt", ["--out", tmp_path / "x.safetensors", "--checkpoint-dir", blocker / "ck"]))}
    results = {what: (p.communicate(timeout=120)[1], p.returncode)[::-1] for what, p in procs.items()}
    code, err = results["out"]
    assert code == 1 and f"output folder {blocker / 'sub'}" in err and "create it or choose another --out" in err, err
    code, err = results["ckpt"]
    assert code == 1 and f"--checkpoint-dir {blocker / 'ck'}" in err and "choose a writable folder" in err, err
    assert "Traceback" not in results["out"][1] + results["ckpt"][1]
    # nothing was written or lost: the refusals came before any training
    assert blocker.read_text() == "a regular file" and not (tmp_path / "ck").exists()
    assert not (tmp_path / "x.safetensors").exists()
    print(f"\nunwritable folder refused up front in {time.time() - started:.1f}s: {results['out'][1].strip()}")


@pytest.mark.skipif(_no_dac_override() is None, reason="running as root without setpriv: permissions not enforced")
def test_read_only_folders_are_refused_before_training_and_a_failed_save_loses_nothing(tmp_path):
    """An ordinary user's read-only folders (root's override dropped): a read-only --out or --checkpoint-dir
    folder is refused before any training (exit 1, the folder and the fix named); and a save that fails at the
    end (the folder turned read-only meanwhile) leaves an earlier table at that path unchanged."""
    prefix = _no_dac_override()
    out_dir, ck_ro = tmp_path / "ro", tmp_path / "ck_ro"
    out_dir.mkdir()
    ck_ro.mkdir()
    earlier = table_version(1).save(out_dir / "x.safetensors").read_bytes()
    probe_cmd = [*prefix, sys.executable, "-c", f"open({str(out_dir / 'probe')!r}, 'w')"]
    out_dir.chmod(0o555)
    ck_ro.chmod(0o555)
    try:
        if subprocess.run(probe_cmd, capture_output=True).returncode == 0:
            pytest.skip("folder permissions are not enforced here even without CAP_DAC_OVERRIDE")
        started = time.time()
        procs = [subprocess.Popen([*prefix, *cli("--out", out, "--checkpoint-dir", c, iterations=40)], cwd=REPO,
                                  env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for out, c in ((tmp_path / "y.safetensors", ck_ro), (out_dir / "x.safetensors", tmp_path / "ck"))]
        (ck_code, ck_err), (code, err) = [(p.communicate(timeout=180)[1], p.returncode)[::-1] for p in procs]
        assert ck_code == 1 and f"checkpoint folder {ck_ro} is not writable" in ck_err, ck_err
        assert "Fix its permissions" in ck_err and not (tmp_path / "y.safetensors").exists()
        assert code == 1 and f"output folder {out_dir} is not writable" in err and "nothing was trained" in err, err
        assert "Traceback" not in ck_err + err and not (tmp_path / "ck").exists()
        refused = time.time() - started
        # the atomic writer itself, failing at the final rename/open: clear message, earlier file intact
        save = [*prefix, sys.executable, "-c", "import sys; from epd_core.tables.params import EPDParams; "
                f"EPDParams.neutral(3, 2).save({str(out_dir / 'x.safetensors')!r})"]
        proc = subprocess.run(save, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
        msg = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 1 and f"cannot write into folder {out_dir}" in msg and "unchanged" in msg, msg
        assert (out_dir / "x.safetensors").read_bytes() == earlier
        assert not [p for p in out_dir.iterdir() if p.name != "x.safetensors"]
    finally:
        out_dir.chmod(0o755)
        ck_ro.chmod(0o755)
    print(f"\nread-only folders refused before training in {refused:.1f}s: {err.strip()}\nfailed save: {msg}")


# ================================================================ (d) two trainers, the same output name
class Watcher(threading.Thread):
    """Loads `paths` over and over while the trainers run; every read must be a complete file."""
    def __init__(self, paths):
        super().__init__(daemon=True)
        self.paths, self.reads, self.errors, self.stop = paths, 0, [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            for path in self.paths:
                if path.exists():
                    try:
                        D.load_checkpoint(path) if path.suffix == ".distill-checkpoint" else EPDParams.load(path)
                        self.reads += 1
                    except Exception as e:  # noqa: BLE001
                        self.errors.append(f"{path.name}: {e}")
            time.sleep(0.01)  # leave the 2 cores to the trainers


def run_pair(out: Path, ckpt_dirs, watch):
    """Trainers with seeds 1 and 2 writing `out` at the same time; returns {seed: (exit code, stderr)}."""
    watcher = Watcher(watch)
    watcher.start()
    procs = {seed: subprocess.Popen(cli("--out", out, "--checkpoint-dir", ck, "--seed", seed, iterations=60),
                                    cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for seed, ck in zip((1, 2), ckpt_dirs)}
    results = {seed: (p.communicate(timeout=180)[1], p.returncode)[::-1] for seed, p in procs.items()}
    watcher.stop.set()
    watcher.join()
    assert not watcher.errors, watcher.errors[:3]
    return results, watcher.reads


def test_two_trainers_writing_the_same_output_name(tmp_path, capsys):
    """Same --out and same --checkpoint-dir (so the same checkpoint file too), started together."""
    # references: each seed alone (in this process, one thread: bit-identical to the subprocesses)
    finals = {}
    for seed in (1, 2):
        assert main_in_process(cli("--out", tmp_path / f"ref{seed}.safetensors", "--checkpoint-dir",
                                   tmp_path / f"ref{seed}", "--seed", seed, iterations=60))[0] == 0
        finals[seed] = D.load_checkpoint(tmp_path / f"ref{seed}" / f"ref{seed}.distill-checkpoint")
    expected = {seed: [ck["tensors"][n].float() for n in THETA_NAMES] for seed, ck in finals.items()}
    assert not torch.equal(expected[1][0], expected[2][0])  # the two results are distinguishable

    def winner(path):
        table = EPDParams.load(path)
        seed = table.metadata["provenance"]["seed"]
        assert all(torch.equal(a, b) for a, b in zip(table.tensors(), expected[seed])), f"not seed {seed}'s table"
        return seed

    shared, ck = tmp_path / "models", tmp_path / "ck_shared"
    shared.mkdir()
    out, path = shared / "same.safetensors", ck / "same.distill-checkpoint"
    results, reads = run_pair(out, [ck, ck], [out, path])
    # both write the same checkpoint path; one that starts after the other's first checkpoint refuses to
    # overwrite it ("already exists")
    for seed, (code, err) in results.items():
        assert code == 0 or (code == 1 and "already exists" in err and "nothing was overwritten" in err), (seed, err)
    assert any(code == 0 for code, _ in results.values())
    table_seed = winner(out)
    last = D.load_checkpoint(path)  # one complete final checkpoint of one of them, never a mix
    ck_seed = last["config"]["seed"]
    assert all(torch.equal(last["tensors"][n], finals[ck_seed]["tensors"][n]) for n in finals[ck_seed]["tensors"])
    assert last["losses"] == finals[ck_seed]["losses"]
    # resuming seed 1 from the shared checkpoint: its own final state, or a clear refusal of seed 2's
    code, err = main_in_process(cli("--out", out, "--checkpoint-dir", ck, "--seed", 1, "--resume", iterations=60),
                                capsys)
    if ck_seed == 1:
        assert code == 0 and winner(out) == 1
    else:
        assert code == 1 and "different settings" in err and "seed: 2 -> 1" in err, err
    print(f"\ntwo trainers, same output name and checkpoint folder: exit codes "
          f"{ {s: c for s, (c, _) in results.items()} }, the output is seed {table_seed}'s complete table, the "
          f"checkpoint seed {ck_seed}'s final one ({reads} concurrent reads, all complete); seed 1 --resume on it: "
          f"{'resumed' if ck_seed == 1 else 'refused (different settings)'}")
