"""Read what torch.save writes (storages of published EPD predictors, reward-model state dicts) without torch.load
or pickle: our own bounded pickle evaluator with an exact allow-list, and the raw bytes copied into tensors with
torch.frombuffer. `torch.load(weights_only=True)` stops code execution, not crashes, memory or time: its unpickler
has no depth, size or time limit (a 200 kB deep tuple key segfaults it, colliding integer keys freeze it, the
allowed bytearray(N) allocates N bytes), so no file byte goes there.

The two layouts torch writes (torch/serialization.py):
* legacy (`_legacy_save`, what `TypedStorage.__reduce__` embeds in a published predictor): five small pickles
  back to back - the magic number, the protocol version 1001, a sys_info dict, the object (storages appear as
  persistent ids ('storage', StorageType, key, location, numel, None)), the sorted list of storage keys - then,
  for each key in that list, its element count as 8 little-endian bytes followed by the raw little-endian data.
* zip (`_save`): one top-level folder holding `data.pkl` (the object; persistent ids ('storage', StorageType,
  key, location, numel)) and `data/<key>` entries with each storage's raw bytes, stored uncompressed.

The parse itself is pure Python + numpy (torch is imported only to hand tensors out), so the isolated importer's
child refuses a hostile file before it pays torch's start-up (epd_core/tables/import_child.py).

Every pickle runs through `_evaluate`: it builds only literals (None, bools, ints, floats, strings, bytes, lists,
tuples, dicts with string keys), the allowed storage types, and - for state dicts - tensors through checked
stand-ins of `torch._utils._rebuild_tensor_v2` / `_rebuild_parameter` and `collections.OrderedDict`. Any other
global or opcode, a value nested deeper or a container larger than its budget, a container changed after it was
used (cycles, shared graphs growing), a storage claiming more bytes than the file has left: TorchFileError,
which names the problem.
"""
from __future__ import annotations

import io
import math
import pickletools
import sys
import zipfile
from typing import NamedTuple

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # torch/serialization.py: the legacy layout's first pickle
PROTOCOL_VERSION = 1001                # its second

# torch.<Name>Storage -> torch dtype name (what `TypedStorage._pickle_storage_type()` names); UntypedStorage holds
# bytes. Each is read into numpy as itself, bfloat16 (which numpy lacks) as its 16-bit patterns (int16, which
# torch.from_numpy takes in every torch version).
STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexDoubleStorage": "complex128", "ComplexFloatStorage": "complex64",
}
_NUMPY = {name: np.dtype(np.int16 if name == "bfloat16" else name) for name in STORAGE_DTYPES.values()}


class TorchFileError(ValueError):
    """A torch-serialized file or storage is refused; the message names the problem (the caller adds the file)."""


class Limits(NamedTuple):
    """Budgets of one pickle: `_evaluate` refuses it as soon as one is exceeded."""
    opcodes: int
    depth: int = 32           # nesting of values and MARKs: deep tuples crash Python's hashing and repr
    items: int = 1000         # items per list, tuple or dict
    key_chars: int = 256      # dict keys: strings only (no hash-colliding integers), at most this long
    storages: int = 1         # distinct storages (persistent ids)
    tensors: int = 0          # _rebuild_tensor_v2 calls
    pickle_bytes: int = 1 << 20  # a zip layout's data.pkl


# The legacy layout's small pickles (magic number, version, sys_info: 25 opcodes; the key list 3 + 2 a key)
HEADER_LIMITS = Limits(opcodes=64, depth=3, items=16)
# One storage, as `_load_from_bytes` receives it: the object pickle is a single persistent id (12 opcodes)
STORAGE_LIMITS = Limits(opcodes=64, depth=3, items=8, storages=1)
# Reward-model state dicts: ViT-H-14 / BLIP have ~1000 tensors of ~25 opcodes each; 10x that is read in ~1 s
STATE_DICT_LIMITS = Limits(opcodes=500_000, depth=32, items=25_000, storages=10_000, tensors=10_000,
                           pickle_bytes=64 << 20)
MAX_NDIM = 8
MAX_ZIP_ENTRIES = 200_000
ZIP_REFUSED_FLAGS = 0x01 | 0x20 | 0x40  # encrypted, compressed patched data, strong encryption (APPNOTE 4.4.4)


class Storage(NamedTuple):
    """One storage's elements as read: a flat numpy array with memory of its own, and torch's dtype name."""
    array: np.ndarray
    dtype: str

    def torch(self):
        import torch  # only here: the parse itself never needs it
        flat = torch.from_numpy(self.array)
        return flat.view(torch.bfloat16) if self.dtype == "bfloat16" else flat


def read_storage(data: bytes):
    """The storage `torch.storage._load_from_bytes(data)` would return, as a flat tensor of its dtype (its own
    memory). `data` is torch's legacy or zip layout of ONE storage, nothing else."""
    return read_storage_array(data).torch()


def read_storage_array(data: bytes) -> Storage:
    """`read_storage` without torch: the storage as a numpy array and its dtype name."""
    if not isinstance(data, (bytes, bytearray)):
        raise TorchFileError("a tensor storage is not stored as bytes")
    result, storages = _read(data, STORAGE_LIMITS)
    if not isinstance(result, _StorageRef):
        raise TorchFileError(f"a tensor storage's bytes hold a {_kind(result)}, not a storage")
    return storages[result.key]


def read_state_dict(path) -> object:
    """What torch.save wrote to `path` (legacy or zip layout), if it is made of dicts, lists, tuples, plain
    values and tensors only; tensors are views of storages that own their memory."""
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(0)
        if head == b"PK\x03\x04":
            size = f.seek(0, io.SEEK_END)
            f.seek(0)
            result, storages = _read_zip(f, STATE_DICT_LIMITS, size)
        else:
            result, storages = _read_legacy(f.read(), STATE_DICT_LIMITS)
    return _materialize(result, storages, [STATE_DICT_LIMITS.items * 10], 0)


def read_bytes(data: bytes, limits: Limits = STATE_DICT_LIMITS) -> object:
    """`read_state_dict` for file contents already in memory, under `limits` (e.g. tighter budgets for a file
    known to be a few kB)."""
    result, storages = _read(data, limits)
    return _materialize(result, storages, [limits.items * 10], 0)


def check_bytes(data: bytes, limits: Limits = STATE_DICT_LIMITS) -> None:
    """Everything `read_bytes` checks, without torch (no tensors are handed out): TorchFileError or None."""
    _read(data, limits)


def _read(data: bytes, limits: Limits):
    if not isinstance(data, (bytes, bytearray)):
        raise TorchFileError("a torch file is not given as bytes")
    data = bytes(data)
    if data[:4] == b"PK\x03\x04":
        return _read_zip(io.BytesIO(data), limits, len(data))
    return _read_legacy(data, limits)


# ---- the two layouts -------------------------------------------------------------------------------------
def _read_legacy(data: bytes, limits: Limits):
    stream = io.BytesIO(data)
    magic = _evaluate(stream, HEADER_LIMITS, "the magic number")
    if not (type(magic) is int and magic == MAGIC_NUMBER):
        raise TorchFileError(f"a legacy torch storage starts with {_kind(magic)} instead of torch's magic number "
                             "(corrupt or crafted)")
    version = _evaluate(stream, HEADER_LIMITS, "the protocol version")
    if not (type(version) is int and version == PROTOCOL_VERSION):  # never formatted: it may be a huge graph
        raise TorchFileError(f"a legacy torch storage has {_kind(version)} as its protocol version, not "
                             f"{PROTOCOL_VERSION}")
    info = _evaluate(stream, HEADER_LIMITS, "the system info")
    if not (type(info) is dict and info.get("little_endian") is True):
        raise TorchFileError("a legacy torch storage was not written on a little-endian machine (or its system "
                             "info is not torch's dict)")
    refs: dict[str, _StorageRef] = {}
    obj = _evaluate(stream, limits, "the object", persistent=_persistent_ids(refs, limits, 6, len(data)))
    keys = _evaluate(stream, HEADER_LIMITS._replace(opcodes=8 + 4 * limits.storages, items=limits.storages),
                     "the storage keys")
    if not (type(keys) is list and len(set(keys)) == len(keys) == len(refs) and set(keys) == set(refs)):
        raise TorchFileError(f"a legacy torch file lists the storage keys {_kind(keys)} for {len(refs)} storage(s) "
                             "it uses (corrupt or crafted)")
    pos, storages = stream.tell(), {}
    for key in keys:
        ref = refs[key]
        if len(data) - pos < 8:
            raise TorchFileError(f"storage '{key}' has no data: the file ends {len(data) - pos} bytes after the "
                                 "pickles (truncated)")
        count = int.from_bytes(data[pos:pos + 8], "little")
        left = len(data) - pos - 8
        if count != ref.numel or count * ref.itemsize > left:
            raise TorchFileError(f"storage '{key}' claims {ref.numel} elements, its data header {count}, and "
                                 f"{left} bytes are left (budget: a storage never claims more than the bytes the "
                                 "file has left)")
        storages[key] = _tensor_from(data, pos + 8, count, ref.dtype, key)
        pos += 8 + count * ref.itemsize
    if pos != len(data):
        raise TorchFileError(f"{len(data) - pos} unexpected bytes follow the last storage's data")
    return obj, storages


def _read_zip(f, limits: Limits, size: int):
    try:
        archive = zipfile.ZipFile(f)
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError) as e:
        raise TorchFileError(f"a torch zip archive is corrupt ({_first_line(e)})") from None
    if len(infos) > MAX_ZIP_ENTRIES:
        raise TorchFileError(f"a torch zip archive has {len(infos)} entries (budget: {MAX_ZIP_ENTRIES})")
    pkls = [i for i in infos if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
    if len(pkls) != 1:
        raise TorchFileError("a zip archive is not torch's layout (exactly one <folder>/data.pkl expected)")
    prefix = pkls[0].filename[:-len("data.pkl")]
    by_name = {}
    for i in infos:
        if not i.filename.startswith(prefix):
            raise TorchFileError(f"a torch zip archive has an entry outside its folder '{prefix}'")
        if i.compress_type != zipfile.ZIP_STORED or i.file_size != i.compress_size or i.file_size > size:
            raise TorchFileError(f"zip entry '{i.filename[:100]}' is compressed or claims {i.file_size} bytes in a "
                                 f"file of {size} (torch stores its entries uncompressed)")
        if i.flag_bits & ZIP_REFUSED_FLAGS:
            raise TorchFileError(f"zip entry '{i.filename[:100]}' is encrypted or patched (flag bits "
                                 f"{i.flag_bits:#06x}; torch writes plain entries)")
        by_name[i.filename] = i

    def read(info) -> bytes:
        try:
            return archive.read(info)
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError, RuntimeError) as e:
            raise TorchFileError(f"zip entry '{info.filename[:100]}' is corrupt ({_first_line(e)})") from None

    order = by_name.get(prefix + "byteorder")
    if order is not None and (order.file_size > 16 or read(order) not in (b"little", b"little\n")):
        raise TorchFileError("the torch zip archive was not written little-endian (its byteorder entry)")
    if pkls[0].file_size > limits.pickle_bytes:
        raise TorchFileError(f"data.pkl is {pkls[0].file_size} bytes (budget: {limits.pickle_bytes})")
    pkl = read(pkls[0])
    stream = io.BytesIO(pkl)
    refs: dict[str, _StorageRef] = {}
    obj = _evaluate(stream, limits, "data.pkl", persistent=_persistent_ids(refs, limits, 5, size))
    if stream.tell() != len(pkl):
        raise TorchFileError(f"{len(pkl) - stream.tell()} unexpected bytes follow the end of data.pkl")
    storages = {}
    for key, ref in refs.items():
        info = by_name.get(f"{prefix}data/{key}")
        if info is None:
            raise TorchFileError(f"storage '{key}' has no data/{key} entry in the zip archive")
        if info.file_size != ref.numel * ref.itemsize:
            raise TorchFileError(f"storage '{key}' claims {ref.numel} elements ({ref.numel * ref.itemsize} bytes), "
                                 f"its entry holds {info.file_size} bytes")
        storages[key] = _tensor_from(read(info), 0, ref.numel, ref.dtype, key)
    return obj, storages


def _tensor_from(data: bytes, offset: int, count: int, dtype: str, key: str) -> Storage:
    """`count` elements at `offset`, copied into an array of its own (checked in bounds by the caller)."""
    if sys.byteorder != "little":
        raise TorchFileError("reading torch files needs a little-endian machine")
    raw = bytearray(memoryview(data)[offset:offset + count * _NUMPY[dtype].itemsize])  # a private, writable copy
    if dtype == "bool" and count and max(raw) > 1:
        raise TorchFileError(f"bool storage '{key}' holds bytes other than 0 and 1")
    return Storage(np.frombuffer(raw, dtype=_NUMPY[dtype]), dtype)


# ---- the bounded evaluator -------------------------------------------------------------------------------
class _StorageRef:
    __slots__ = ("key", "dtype", "numel", "itemsize")

    def __init__(self, key, dtype, numel):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.itemsize = _NUMPY[dtype].itemsize


class _StorageType:
    __slots__ = ("dtype",)

    def __init__(self, dtype):
        self.dtype = dtype


class _Pending:
    """A tensor view, checked against its storage; built once the storages are read (legacy: after the pickle)."""
    __slots__ = ("ref", "offset", "size", "stride")

    def __init__(self, ref, offset, size, stride):
        self.ref, self.offset, self.size, self.stride = ref, offset, size, stride


class _Global:
    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name


_STORAGE_TYPES = {("torch", n): d for n, d in STORAGE_DTYPES.items()}
_STORAGE_TYPES[("torch", "UntypedStorage")] = _STORAGE_TYPES[("torch.storage", "UntypedStorage")] = "uint8"
_CALLABLES = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
              ("collections", "OrderedDict")}


class _V:
    """A value on the evaluator's stack: the object, its nesting depth, and whether it is already an item of
    another value (then it may no longer change: real pickles fill a container before using it)."""
    __slots__ = ("obj", "depth", "used")

    def __init__(self, obj, depth=0):
        self.obj, self.depth, self.used = obj, depth, False


def _persistent_ids(refs: dict, limits: Limits, length: int, size: int):
    """The one persistent-id form torch writes: ('storage', StorageType, key, location, numel[, None])."""
    claimed = [0]  # bytes of all storages so far (a running total: 100,000 storages stay linear)

    def load(pid):
        if not (type(pid) is tuple and len(pid) == length and pid[0] == "storage"):
            raise TorchFileError(f"a persistent id is {_kind(pid)}, not torch's ('storage', type, key, location, "
                                 f"numel{', None' if length == 6 else ''})")
        _, stype, key, location, numel = pid[:5]
        if length == 6 and pid[5] is not None:
            raise TorchFileError("a storage is saved as a view of another storage (torch < 0.4), which is not read")
        if not (isinstance(stype, _StorageType) and type(key) is str and 0 < len(key) <= 64 and type(location) is str
                and len(location) <= 64 and type(numel) is int and numel >= 0):
            raise TorchFileError("a storage's persistent id does not hold a storage type, a short key, a location "
                                 "and an element count")
        ref = refs.get(key)
        if ref is not None:
            if (ref.dtype, ref.numel) != (stype.dtype, numel):
                raise TorchFileError(f"storage '{key}' is used with two types or sizes")
            return ref
        if len(refs) >= limits.storages:
            raise TorchFileError(f"the file holds more than {limits.storages} storage(s) (budget)")
        ref = _StorageRef(key, stype.dtype, numel)
        claimed[0] += numel * ref.itemsize
        if claimed[0] > size:  # checked exactly when the data is read; refused here before anything is built
            raise TorchFileError(f"storage '{key}' claims {numel} elements ({numel * ref.itemsize} bytes), more than "
                                 f"the file's {size} bytes (budget: a storage never claims more than the bytes "
                                 "the file has)")
        refs[key] = ref
        return ref
    return load


def _call(name: str, args: tuple, counts: dict, limits: Limits):
    if name == "collections.OrderedDict":  # a state dict, or a tensor's (empty) backward hooks
        if args:
            raise TorchFileError("an OrderedDict is rebuilt with arguments, which torch never writes")
        return _ODict()
    if name == "torch._utils._rebuild_parameter":
        if not (2 <= len(args) <= 3 and isinstance(args[0], _Pending) and _no_hooks(args[2:])):
            raise TorchFileError("a parameter does not wrap a tensor (or has backward hooks)")
        return args[0]
    # torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks[, metadata])
    counts["tensors"] = counts.get("tensors", 0) + 1
    if counts["tensors"] > limits.tensors:
        raise TorchFileError(f"the file builds more than {limits.tensors} tensors (budget)")
    if not 4 <= len(args) <= 7:
        raise TorchFileError("a tensor is rebuilt with the wrong number of arguments")
    ref, offset, size, stride = args[:4]
    if not (isinstance(ref, _StorageRef) and type(size) is tuple and type(stride) is tuple
            and len(size) == len(stride) <= MAX_NDIM
            and all(type(v) is int and v >= 0 for v in (offset, *size, *stride))):
        raise TorchFileError("a tensor has an invalid storage, shape, stride or offset")
    if not _no_hooks(args[5:6]) or (len(args) == 7 and args[6] not in (None, {})):
        raise TorchFileError("a tensor carries backward hooks or metadata, which saved weights never have")
    numel = math.prod(size)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if numel else offset - 1
    if numel > ref.numel or last >= ref.numel:  # e.g. stride 0: a view larger than its storage
        raise TorchFileError(f"a tensor view of shape {size} claims {numel} elements up to index {last} of a "
                             f"storage of {ref.numel} (budget: a view never holds more elements than its storage)")
    return _Pending(ref, offset, size, stride)


class _ODict(dict):
    """What OrderedDict is rebuilt as: a dict (no __dict__ or methods for BUILD to replace)."""
    __slots__ = ()


def _no_hooks(rest) -> bool:
    return not rest or (type(rest[0]) in (_ODict, dict) and not rest[0])


class Hooks:
    """What a pickle's globals, calls (REDUCE, NEWOBJ), BUILDs and persistent ids become. This base refuses them
    all; exceptions of the types in `passthrough` that the hooks raise reach the caller unchanged."""
    passthrough: tuple = ()

    def find(self, module: str, attr: str):
        raise TorchFileError(f"refused: the pickle asks for the Python global '{str(module)[:100]}."
                             f"{str(attr)[:100]}', which torch's layout of saved weights never needs here")

    def call(self, func, args: tuple, op: str):
        raise TorchFileError(f"refused: the pickle calls a {_kind(func)} ({op})")

    def build(self, target, state) -> None:
        raise TorchFileError(f"refused: BUILD applied to a {_kind(target)}")

    def persistent(self, pid):
        raise TorchFileError("refused: the opcode BINPERSID, which this pickle never contains")


class _TorchHooks(Hooks):
    """torch's saved weights: storage types, persistent ids, and (state dicts) the tensor stand-ins."""

    def __init__(self, limits: Limits, persistent=None):
        self.limits, self.load, self.counts = limits, persistent, {}

    def find(self, module, attr):
        key = (module, attr) if type(module) is str and type(attr) is str else None
        if self.load is not None and key in _STORAGE_TYPES:
            return _StorageType(_STORAGE_TYPES[key])
        if self.limits.tensors and key in _CALLABLES:
            return _Global(f"{module}.{attr}")
        return super().find(module, attr)

    def call(self, func, args, op):
        if op != "REDUCE" or not isinstance(func, _Global):
            return super().call(func, args, op)
        return _call(func.name, args, self.counts, self.limits)

    def build(self, target, state):
        # torch.save(module.state_dict()) sets the dict's `_metadata` (layer versions): read, then dropped
        if type(target) is not _ODict or type(state) is not dict:
            super().build(target, state)

    def persistent(self, pid):
        return super().persistent(pid) if self.load is None else self.load(pid)


_SCALARS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}
_LITERALS = ("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT", "UNICODE",
             "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8")
_PY2_STRINGS = ("STRING", "BINSTRING", "SHORT_BINSTRING")  # decoded as ASCII, as pickle does by default


def _evaluate(stream, limits: Limits, what: str, persistent=None):
    return evaluate(stream, limits, what, _TorchHooks(limits, persistent))


def evaluate(stream, limits: Limits, what: str, hooks: Hooks):
    """Run ONE pickle from `stream` (stopping after its STOP) within `limits`, building only literals and what
    `hooks` make of globals, calls, BUILDs and persistent ids. Our own replacement for pickle's unpickler: every
    opcode is handled here, bounded, or refused."""
    stack: list[_V] = []
    marks: list[int] = []
    memo: dict[int, _V] = {}

    def fail(problem):
        raise TorchFileError(f"{what}: {problem}")

    def pop(n):
        if len(stack) - (marks[-1] if marks else 0) < n:
            fail("the opcodes do not fit together (stack underflow; corrupt or crafted)")
        items = stack[len(stack) - n:]
        del stack[len(stack) - n:]
        return items

    def pop_mark():
        if not marks:
            fail("the opcodes do not fit together (no MARK; corrupt or crafted)")
        start = marks.pop()
        items = stack[start:]
        del stack[start:]
        return items

    def top():
        if len(stack) <= (marks[-1] if marks else 0):
            fail("the opcodes do not fit together (stack underflow; corrupt or crafted)")
        return stack[-1]

    def nest(v: _V, items) -> _V:
        for item in items:
            item.used = True
            v.depth = max(v.depth, item.depth + 1)
        if v.depth > limits.depth:
            fail(f"refused: values nested more than {limits.depth} levels deep (budget: nesting depth "
                 f"{limits.depth}; a deep tuple used as a key crashes Python's hashing)")
        if type(v.obj) in (list, tuple, dict, _ODict, set, frozenset) and len(v.obj) > limits.items:
            fail(f"refused: a {_kind(v.obj)} of more than {limits.items} items (budget: {limits.items} items per "
                 "container)")
        return v

    def mutate(target: _V, kind, op, items) -> object:
        for item in items:
            item.used = True
        if type(target.obj) not in kind:
            fail(f"refused: {op} applied to a {_kind(target.obj)}")
        if target.used:
            fail(f"refused: a {_kind(target.obj)} changed after it was used ({op}; budget: containers are complete "
                 "before use, which rules out cycles and growing shared graphs)")
        return target.obj

    def keys(items, what="dict key"):
        for k in items:
            if not (type(k.obj) is str and len(k.obj) <= limits.key_chars):
                fail(f"refused: a {_kind(k.obj)} used as a {what} (budget: {what}s are strings of at most "
                     f"{limits.key_chars} characters)")
        return [k.obj for k in items]

    def pairs(items):
        if len(items) % 2:
            fail("the opcodes do not fit together (odd number of dict items)")
        return list(zip(keys(items[0::2]), (x.obj for x in items[1::2])))

    count = 0
    try:
        for op, arg, pos in pickletools.genops(stream):
            count += 1
            if count > limits.opcodes:
                fail(f"refused: more than {limits.opcodes} opcodes (budget: {limits.opcodes} opcodes)")
            name = op.name
            if name == "FRAME":  # pickle refuses a frame that runs past the end of the data; so do we
                here = stream.tell()
                end = stream.seek(0, io.SEEK_END)
                stream.seek(here)
                if here + arg > end:
                    fail(f"the pickle is truncated or corrupt (a frame of {arg} bytes at byte {pos} runs past the "
                         "end)")
                continue
            if name == "PROTO":
                continue
            if name == "STOP":
                if len(stack) != 1 or marks:
                    fail("the opcodes do not fit together (the pickle does not end with one value)")
                return stack[0].obj
            if name in _SCALARS:
                stack.append(_V(_SCALARS[name]))
            elif name in _LITERALS:
                stack.append(_V(arg))
            elif name in _PY2_STRINGS:
                if not str(arg).isascii():
                    fail(f"a Python 2 string at byte {pos} is not ASCII (corrupt or crafted)")
                stack.append(_V(str(arg)))
            elif name == "BYTEARRAY8":
                stack.append(_V(bytearray(arg)))
            elif name in ("EMPTY_LIST", "EMPTY_DICT", "EMPTY_TUPLE", "EMPTY_SET"):
                stack.append(_V({"EMPTY_LIST": list, "EMPTY_DICT": dict, "EMPTY_TUPLE": tuple,
                                 "EMPTY_SET": set}[name]()))
            elif name == "MARK":
                if len(marks) >= limits.depth:
                    fail(f"refused: more than {limits.depth} nested MARKs (budget: nesting depth {limits.depth})")
                marks.append(len(stack))
            elif name in ("LIST", "TUPLE"):
                items = pop_mark()
                v = _V([i.obj for i in items] if name == "LIST" else tuple(i.obj for i in items))
                stack.append(nest(v, items))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                items = pop(int(name[-1]))
                stack.append(nest(_V(tuple(i.obj for i in items)), items))
            elif name == "DICT":
                items = pop_mark()
                stack.append(nest(_V(dict(pairs(items))), items))
            elif name == "FROZENSET":
                items = pop_mark()
                stack.append(nest(_V(frozenset(keys(items, "set item"))), items))
            elif name in ("APPEND", "APPENDS"):
                items = pop(1) if name == "APPEND" else pop_mark()
                target = top()
                mutate(target, (list,), name, items).extend(i.obj for i in items)
                nest(target, items)
            elif name in ("SETITEM", "SETITEMS"):
                items = pop(2) if name == "SETITEM" else pop_mark()
                target = top()
                mutate(target, (dict, _ODict), name, items).update(pairs(items))
                nest(target, items)
            elif name == "ADDITEMS":
                items = pop_mark()
                target = top()
                mutate(target, (set,), name, items).update(keys(items, "set item"))
                nest(target, items)
            elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                index = len(memo) if name == "MEMOIZE" else arg
                if not (type(index) is int and 0 <= index <= count):
                    fail(f"memo index {index} at byte {pos} is impossible in a real file (corrupt or crafted)")
                memo[index] = top()
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                if arg not in memo:
                    fail(f"memo index {arg} at byte {pos} was never stored (corrupt or crafted)")
                stack.append(memo[arg])
            elif name == "POP":
                if marks and marks[-1] == len(stack):
                    marks.pop()
                else:
                    pop(1)
            elif name == "POP_MARK":
                pop_mark()
            elif name == "DUP":
                stack.append(top())
            elif name in ("GLOBAL", "STACK_GLOBAL"):
                if name == "GLOBAL":
                    module, _, attr = str(arg).partition(" ")
                else:
                    module, attr = (v.obj for v in pop(2))
                stack.append(_V(hooks.find(module, attr)))
            elif name in ("REDUCE", "NEWOBJ", "NEWOBJ_EX"):
                func, args = pop(2) if name != "NEWOBJ_EX" else pop(3)[:2]
                if type(args.obj) is not tuple:
                    fail(f"refused: a call ({name}) whose arguments are a {_kind(args.obj)}")
                stack.append(nest(_V(hooks.call(func.obj, args.obj, name)), [args]))
            elif name == "BUILD":
                state, = pop(1)
                target = top()
                if target.used:
                    fail(f"refused: BUILD applied to a {_kind(target.obj)} after it was used")
                hooks.build(target.obj, state.obj)
                nest(target, [state])
            elif name == "BINPERSID":
                pid, = pop(1)
                stack.append(_V(hooks.persistent(pid.obj)))
            else:  # PERSID, INST, OBJ, EXT1/2/4, NEXT_BUFFER, READONLY_BUFFER and anything newer
                fail(f"refused: the opcode {name}, which this pickle never contains")
    except TorchFileError as e:  # a hook's refusal gets the pickle's name too
        if str(e).startswith(f"{what}: "):
            raise
        raise TorchFileError(f"{what}: {e}") from None
    except Exception as e:  # noqa: BLE001 - genops raises ValueError mostly, but corrupt input may do more
        if hooks.passthrough and isinstance(e, hooks.passthrough):
            raise
        fail(f"the pickle is truncated or corrupt ({type(e).__name__}: {_first_line(e)})")
    fail("the pickle is truncated (no STOP)")


def _materialize(v, storages: dict, budget: list, depth: int):
    """A copy of the evaluated value with tensors in place of the checked views; visits at most budget[0] values
    (shared references could make a small pickle a huge graph)."""
    budget[0] -= 1
    if budget[0] < 0 or depth > STATE_DICT_LIMITS.depth:
        raise TorchFileError("refused: the saved object is a graph of too many shared values (budget)")
    if isinstance(v, _Pending):
        return storages[v.ref.key].torch().as_strided(v.size, v.stride, v.offset)
    if isinstance(v, _StorageRef):
        raise TorchFileError("the file holds a bare storage, not tensors")
    if isinstance(v, dict):
        return {k: _materialize(x, storages, budget, depth + 1) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_materialize(x, storages, budget, depth + 1) for x in v)
    return v


def _kind(v) -> str:
    """A short, safe description of an untrusted value (never its repr: it may be a huge graph)."""
    if v is None or type(v) is bool or (type(v) is int and abs(v) < 10 ** 20):
        return repr(v)
    return {_ODict: "dict", _StorageRef: "storage", _Pending: "tensor", _StorageType: "storage type",
            _Global: "global"}.get(type(v), type(v).__name__)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
