"""Tiny hostile predictor pickles (issue 21, item 1): each is far below the file-size budget and, without the
importer's opcode walk, crashes, freezes or exhausts the process that unpickles it. STORAGE_ATTACKS (issue 29):
the bytes inside a valid `torch.storage._load_from_bytes` call (the storage of a published predictor), which
torch.load(weights_only=True) crashed, froze or bloated on; bench/hostile_imports.py measures every refusal.

    python bench/hostile_pickles.py     measures each refusal through the CLI: seconds and peak memory (RSS)
                                        against a real-size predictor's import in the same way
"""
from __future__ import annotations

import io
import pickle
import zipfile
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PROTO4 = b"\x80\x04"
MEMOIZE, STOP, MARK, REDUCE, APPEND, EMPTY_LIST = b"\x94", b".", b"(", b"R", b"a", b"]"


def binget(i: int) -> bytes:
    return b"h" + bytes([i])


def global_(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def binunicode(text: str) -> bytes:
    raw = text.encode()
    return b"X" + len(raw).to_bytes(4, "little") + raw


def long1(value: int) -> bytes:
    raw = pickle.encode_long(value)
    return b"\x8a" + bytes([len(raw)]) + raw


def deep_tuple_key(depth: int = 200_000) -> bytes:
    """A dict whose key is a tuple nested `depth` deep: hashing it recurses in C (SIGSEGV at ~200,000)."""
    return PROTO4 + b"}" + b")" + b"\x85" * depth + b"Ns" + STOP


def deep_tuple_set_item(depth: int = 200_000) -> bytes:
    """The same tuple as the item of a set (EMPTY_SET, MARK, item, ADDITEMS)."""
    return PROTO4 + b"\x8f(" + b")" + b"\x85" * depth + b"\x90" + STOP


def colliding_int_keys(n: int = 40_000) -> bytes:
    """A dict of `n` integer keys that all hash to 0 (k * (2**61 - 1)): quadratic time inside one C call."""
    return PROTO4 + b"}(" + b"".join(long1(k * (2 ** 61 - 1)) + b"N" for k in range(1, n + 1)) + b"u" + STOP


def empty_sets(n: int = 1_000_000) -> bytes:
    """`n` EMPTY_SET opcodes, one byte each, left on the stack: ~250 bytes of memory per byte of file."""
    return PROTO4 + b"\x8f" * n + STOP


def legacy_storage(values: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.save(values._typed_storage(), buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def stride_zero_views(n: int = 3000, shape=(4096, 64)) -> bytes:
    """`n` calls of the allowed _rebuild_tensor_v2 stand-in, all reusing one memoised argument tuple: a storage
    of one float, viewed with stride 0 as `shape` (2 MiB per call when cloned), 6 bytes of file per call."""
    storage = legacy_storage(torch.zeros(1))
    size = b"(" + b"".join(b"M" + d.to_bytes(2, "little") for d in shape) + b"t"
    head = (PROTO4 + global_("torch._utils", "_rebuild_tensor_v2") + MEMOIZE                  # memo 0
            + b"(" + global_("torch.storage", "_load_from_bytes") + b"C" + bytes([len(storage)]) + storage
            + b"\x85R" + b"K\x00" + size + b"(" + b"K\x00" * len(shape) + b"t\x89Nt" + MEMOIZE  # memo 1: args
            + EMPTY_LIST)
    return head + (binget(0) + binget(1) + REDUCE + APPEND) * n + STOP


def codecs_encode_copies(n: int = 200, chars: int = 100_000) -> bytes:
    """Protocol-2 style bytes: `n` calls of the allowed _codecs.encode stand-in on one memoised string."""
    head = (b"\x80\x02" + global_("_codecs", "encode") + b"q\x00"
            + binunicode("a" * chars) + binunicode("latin1") + b"\x86q\x01" + EMPTY_LIST)
    return head + (binget(0) + binget(1) + REDUCE + APPEND) * n + STOP


# ---- issue 29: the storage bytes of a predictor (torch's legacy and zip layouts) --------------------------------
TORCH_MAGIC, TORCH_PROTOCOL = 0x1950A86A20F9469CFC6C, 1001  # torch/serialization.py
SYS_INFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}


def binbytes(raw: bytes) -> bytes:
    return b"B" + len(raw).to_bytes(4, "little") + raw


def storage_call(inner: bytes) -> bytes:
    """A valid outer pickle: the call torch.storage._load_from_bytes(inner), as a predictor stores a storage."""
    return PROTO4 + global_("torch.storage", "_load_from_bytes") + binbytes(inner) + b"\x85R" + STOP


def legacy_prefix(pickles: int) -> bytes:
    """The first `pickles` small pickles of torch's legacy layout, as torch writes them: magic number, protocol
    version, sys_info."""
    return b"".join(pickle.dumps(v, protocol=2) for v in (TORCH_MAGIC, TORCH_PROTOCOL, SYS_INFO)[:pickles])


def torch_zip(data_pkl: bytes, entries: dict | None = None) -> bytes:
    """torch's zip layout: archive/data.pkl (+ data/<key> entries), stored uncompressed as torch writes it."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", data_pkl)
        for name, raw in (entries or {}).items():
            z.writestr(f"archive/{name}", raw)
        z.writestr("archive/byteorder", "little")
    return buf.getvalue()


def storage_bytearray(n: int = 600_000_000) -> bytes:
    """bytearray(n): allowed by torch's weights-only unpickler, which then allocates n bytes (72 bytes of file)."""
    return legacy_prefix(0) + b"\x80\x02" + global_("builtins", "bytearray") + b"J" + n.to_bytes(4, "little") \
        + b"\x85R" + STOP


def storage_shared_graph(width: int = 16, depth: int = 12) -> bytes:
    """A graph of `width` references to one list, `depth` deep, as the protocol version: torch formats it into its
    error message, visiting width**depth nodes."""
    inner: list = []
    for _ in range(depth):
        inner = [inner] * width
    return legacy_prefix(1) + pickle.dumps(inner, protocol=2)


def storage_stride_zero(n: int = 150_000_000) -> bytes:
    """A zip whose data.pkl is a tensor of n elements viewed with stride 0 on a 1-element FloatStorage: torch.load
    returns the view, and any conversion (.to(float64), clone) materialises n elements."""
    pid = b"(" + binunicode("storage") + global_("torch", "FloatStorage") + binunicode("0") + binunicode("cpu") \
        + b"K\x01t"
    pkl = (b"\x80\x02" + global_("torch._utils", "_rebuild_tensor_v2") + b"(" + pid + b"Q" + b"K\x00"
           + b"J" + n.to_bytes(4, "little") + b"\x85" + b"K\x00\x85" + b"\x89"
           + global_("collections", "OrderedDict") + b")Rt" + b"R" + STOP)
    return torch_zip(pkl, {"data/0": bytes(4)})


STORAGE_ATTACKS = {  # title -> (inner bytes, words the refusal names)
    "deep tuple key (legacy layout)": (lambda: legacy_prefix(2) + deep_tuple_key(200_000),
                                       "nested more than 3 levels deep"),
    "deep tuple key (zip data.pkl)": (lambda: torch_zip(deep_tuple_key(300_000)), "data.pkl: refused: values nested"),
    "80,000 colliding integer keys": (lambda: legacy_prefix(2) + colliding_int_keys(80_000), "more than 64 opcodes"),
    "bytearray(6e8)": (storage_bytearray, "the Python global 'builtins.bytearray'"),
    "shared-list graph as the version": (storage_shared_graph, "the protocol version: refused"),
    "stride-0 view of TypedStorage(1)": (storage_stride_zero, "the Python global 'torch._utils._rebuild_tensor_v2'"),
    "1 MB of EMPTY_SET": (lambda: legacy_prefix(0) + empty_sets(1_000_000 - 64),
                          "the magic number: refused: more than 64 opcodes"),
}


ATTACKS = {
    "deep tuple as a dict key": deep_tuple_key,
    "deep tuple as a set item": deep_tuple_set_item,
    "40,000 colliding integer keys": colliding_int_keys,
    "1 MB of EMPTY_SET": empty_sets,
    "stride-0 tensor views (memo reuse)": stride_zero_views,
    "_codecs.encode copies (memo reuse)": codecs_encode_copies,
}


def run_cli(path: Path, out: Path, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float, float]:
    """Import `path` with the CLI in a fresh process; returns the process, its seconds and its peak RSS in MB.
    The peak is read from `/usr/bin/time -f %M` so that it belongs to this process alone."""
    start = time.monotonic()
    proc = subprocess.run(["/usr/bin/time", "-f", "PEAK_KB %M", sys.executable, "-m", "epd_core.import_official",
                           str(path), str(out)], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    seconds = time.monotonic() - start
    peak_kb = [line for line in proc.stderr.splitlines() if line.startswith("PEAK_KB ")]
    return proc, seconds, int(peak_kb[-1].split()[1]) / 1024 if peak_kb else float("nan")


def in_process(data: bytes) -> tuple[float, float]:
    """The importer's own time (s) for one refusal and how much this process's peak RSS grew (MB)."""
    from epd_core.tables.import_official import EPDImportError, import_official_bytes
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        import_official_bytes(data, source="hostile.pkl")
    except EPDImportError:
        pass
    return time.perf_counter() - start, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024


def main() -> int:
    sys.path.insert(0, str(REPO))
    from bench.official_pickle import official_pickle
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        good = tmp / "real_size.pkl"
        good.write_bytes(official_pickle())
        in_process(good.read_bytes())  # imports and first-call allocations, before anything is measured
        _, base_s, base_mb = run_cli(good, tmp / "good.safetensors")
        print(f"{'file':36s} {'bytes':>8s} {'CLI s':>6s} {'CLI peak MB':>11s} {'vs import':>9s} "
              f"{'importer ms':>11s} {'+MB':>5s}")
        seconds, grown = in_process(good.read_bytes())
        print(f"{'real-size predictor (imports)':36s} {good.stat().st_size:8d} {base_s:6.2f} {base_mb:11.0f} "
              f"{0:+9.0f} {seconds * 1e3:11.1f} {grown:5.1f}")
        for title, build in ATTACKS.items():
            data = build()
            path = tmp / "hostile.pkl"
            path.write_bytes(data)
            proc, cli_s, peak = run_cli(path, tmp / "out.safetensors")
            first = proc.stderr.strip().splitlines()[0] if proc.stderr.strip() else ""
            seconds, grown = in_process(data)
            print(f"{title:36s} {len(data):8d} {cli_s:6.2f} {peak:11.0f} {peak - base_mb:+9.0f} "
                  f"{seconds * 1e3:11.1f} {grown:5.1f}  rc={proc.returncode} {first.split(': ', 2)[-1][:110]}")
    print("CLI s / peak: a fresh `python -m epd_core.import_official` (interpreter and torch start-up included), "
          "'vs import' against importing the real-size file; importer ms / +MB: the refusal alone, in process.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
