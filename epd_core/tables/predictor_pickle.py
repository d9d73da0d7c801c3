"""Read an EPD predictor pickle (or another published format's, formats.py) into inert values, safely and without
torch (the conversion into a table is epd_core/tables/import_official.py's). Pure Python + numpy, so the importer's
isolated child refuses a hostile file before it pays torch's start-up. `_plain` copies untrusted attributes for a
table's provenance within a budget.

1. `_prescan` runs the opcode stream on abstract values (pickletools.genops), building nothing: the file must be
   one complete pickle with no persistent ids, sane memo indices, only the allowed globals, and within explicit
   budgets (PICKLE_MAX_*).
2. Our own pickle evaluator (epd_core/tables/torch_storage.py `evaluate`, with `_Hooks`) builds the values, resolving
   only the few names such a file uses, each to an inert stand-in defined here; storages are read by the same
   evaluator in torch's legacy and zip layouts, tensors become numpy arrays (`_Array.tensor` hands torch one).
"""
from __future__ import annotations

import io
import math
import pickle
import pickletools

import numpy as np

from epd_core.tables.formats import FORMATS
from epd_core.tables.torch_storage import (Hooks, Limits, Storage, TorchFileError, check_bytes, evaluate,
                                           read_storage_array)

# What a predictor pickle may make the unpickler build, checked by an opcode walk before anything is built
# (_prescan). A published predictor is 3-7 kB: a few hundred opcodes, a dozen levels deep, four 10 x 2 tables.
MAX_PKL_BYTES = 1024 * 1024         # the file
PICKLE_MAX_OPCODES = 10_000         # each builds at most one small object
PICKLE_MAX_DEPTH = 32               # nesting of values (and of MARKs): deep tuples crash Python's hashing
PICKLE_MAX_ITEMS = 1000             # items per list, tuple, dict or set
PICKLE_MAX_KEY_CHARS = 128          # dict keys and set items: strings only (no hash-collision integers)
PICKLE_MAX_TENSOR_BYTES = 1024 * 1024  # storages, tensor views (8 bytes an element) and encoded bytes, in all
PICKLE_MAX_BUILDS = 16              # BUILD calls (state of a torch.nn activation placeholder)
PICKLE_MAX_CALLS = {                # calls (REDUCE / NEWOBJ) of each allowed global
    "torch_utils.persistence._reconstruct_persistent_obj": 8,
    "torch._utils._rebuild_parameter": 16, "torch._utils._rebuild_tensor_v2": 16,
    "torch.storage._load_from_bytes": 16, "_codecs.encode": 64, "builtins.set": 64, "__builtin__.set": 64,
    "collections.OrderedDict": 256,
    "torch.nn.modules.activation.Sigmoid": 16, "torch.nn.modules.activation.Softmax": 16,
}
_MAX_TENSOR_ELEMENTS = 4096 * 64  # params.MAX_STEPS * MAX_POINTS (written out: this module never imports torch)
_FIX_BUDGET = ("An official EPD predictor is a few kB with a few dozen objects; this file is crafted or not an EPD "
               "predictor. Nothing in it was built, run or written. Use the .pkl from the EPD authors' release "
               "(Import EPD Predictor's 'official:' choices fetch and verify it).")
_FIX_REFUSED = ("The file is not an official EPD predictor or has been tampered with; nothing in it was run. "
                "Use the .pkl from the EPD authors' release.")


class Refusal(ValueError):
    """A predictor file is refused; the message names the file, the problem and the fix (the importer's
    EPDImportError is one)."""


def failer(source: str, error: type = Refusal):
    """The `fail(problem, fix)` every check here calls: raises `error` naming `source`."""
    def fail(problem: str, fix: str = "Use the .pkl predictor file published by the EPD authors."):
        raise error(f"{source}: {problem}. {fix}")
    return fail


def is_torch_zip(data: bytes) -> bool:
    return data[:4] == b"PK\x03\x04"


def parse(data: bytes, fail):
    """The values an official EPD predictor pickle (or another format's, formats.py) holds, built from inert
    stand-ins (tensors as numpy arrays), or `fail(problem, fix)`. A zip (torch.save's layout, e.g. DyWeight's FLUX
    .pt) is checked by torch_storage within its format's budget and returned as None: its format's converter reads
    it."""
    if len(data) > MAX_PKL_BYTES:
        fail(f"{len(data)} bytes is far too large for an EPD predictor", "Check that this is the right file.")
    if is_torch_zip(data):  # checked within the budget of a format that imports zips, read by its converter
        zips = [f for f in FORMATS if getattr(f, "ZIP_LIMITS", None) is not None]
        if not zips:
            fail("this is a zip archive (a torch.save checkpoint), not a predictor pickle", _FIX_REFUSED)
        refusals = []
        for fmt in zips:  # the first format whose budget it passes; its converter then recognises it or not
            try:
                check_bytes(data, fmt.ZIP_LIMITS)
                return None
            except TorchFileError as e:
                refusals.append((e, fmt))
        e, fmt = refusals[0]
        fail(f"refused: {e}", fmt.FIX_ZIP if len(zips) == 1 else " / ".join(f.FIX_ZIP for f in zips))
    _check_magic(data, fail)
    _prescan(data, fail)
    try:
        return evaluate(io.BytesIO(data), _OUTER_LIMITS, "the pickle", _Hooks())
    except _OldBranch as e:
        fail(str(e), _FIX_OLD_BRANCH)
    except _OverBudget as e:
        fail(str(e), _FIX_BUDGET.replace("built, run", "run"))  # the walk passed: small objects were built
    except _Refused as e:
        fail(str(e), _FIX_REFUSED)
    except (_Bad, TorchFileError) as e:
        fail(str(e), "The file is damaged or not an official EPD predictor; download it again.")
    except Exception as e:  # noqa: BLE001 - a corrupt pickle can raise almost anything; never crash the caller
        fail(f"the pickle is corrupt ({type(e).__name__}: {_first_line(e)})",
             "The file is damaged or not an official EPD predictor; download it again.")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


class _Bad(Exception):
    """Raised by the stand-ins, which do not know the file name; turned into EPDImportError by the caller."""


class _Refused(_Bad):
    """A forbidden global or persistent id."""


class _OverBudget(_Refused):
    """A budget that only a call can check (a tensor view larger than its storage)."""


# ---- inert stand-ins for the names an official file uses ------------------------------------------------
class _Inert:
    """Base of the objects the stand-ins create. They support no container protocol and refuse pickle BUILD
    state, so crafted opcodes (SETITEM, APPEND, BUILD ...) cannot drive them, nor reach torch through them."""
    __slots__ = ()

    def __setstate__(self, state):
        raise _Refused(f"refused: the pickle tries to set attributes of a {type(self).__name__.strip('_')} object, "
                       "which an official EPD predictor never does")


class _Record(_Inert):
    """What the persistence hook returns: the meta dict, never the class it describes."""
    __slots__ = ("meta",)

    def __init__(self, meta):
        self.meta = meta


class _Array(_Inert):
    """A tensor rebuilt from a storage (wrapped, see _Inert): its elements (a numpy array of its own) and dtype."""
    __slots__ = ("array", "dtype")

    def __init__(self, array, dtype):
        self.array, self.dtype = array, dtype

    @property
    def tensor(self):
        return Storage(self.array, self.dtype).torch()


class _Storage(_Inert):
    __slots__ = ("flat",)

    def __init__(self, flat):
        self.flat = flat


class _Module(_Inert):
    """Placeholder for a torch.nn activation module: keeps its pickled __dict__ as data, runs nothing."""
    __slots__ = ("state",)

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise _Bad("a torch.nn module placeholder got a non-dict state")
        self.state = state


class _Sigmoid(_Module):
    __slots__ = ()


class _Softmax(_Module):
    __slots__ = ()


def _reconstruct_persistent_obj(meta):
    return _Record(meta)


def _load_from_bytes(data):
    """A storage saved by torch (legacy or zip layout), read by our own bounded parser
    (epd_core/tables/torch_storage.py):
    no byte of the file reaches torch.load or pickle.loads."""
    if not isinstance(data, bytes):
        raise _Bad("a tensor storage is not stored as bytes")
    try:
        flat = read_storage_array(data)
    except TorchFileError as e:
        text = str(e)
        kind = _OverBudget if "budget" in text else _Refused if "refused" in text else _Bad
        raise kind(f"refused: a tensor storage: {text}") from None
    return _Storage(flat)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if not isinstance(storage, _Storage):
        raise _Bad("a tensor is not built from a storage")
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride) <= 8
            and all(type(v) is int and v >= 0 for v in (storage_offset, *size, *stride))):
        raise _Bad("a tensor has an invalid shape, stride or offset")
    if math.prod(size) > _MAX_TENSOR_ELEMENTS:  # checked before as_strided/clone allocate anything
        raise _Bad(f"a tensor of shape {size} is far larger than an EPD table")
    flat = storage.flat.array
    available = flat.size - storage_offset
    if math.prod(size) > available:  # e.g. stride 0: a view that a copy would blow up
        raise _OverBudget(f"refused: a tensor view of shape {size} claims {math.prod(size)} elements from a storage "
                       f"of {max(available, 0)} (budget: a view never holds more elements than its storage)")
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))  # as_strided itself checks nothing
    if math.prod(size) and last >= flat.size:
        raise _Bad(f"a tensor of shape {size} does not fit in its storage (file corrupt)")
    view = np.lib.stride_tricks.as_strided(flat[storage_offset:], size, [s * flat.itemsize for s in stride])
    return _Array(view.copy(), storage.flat.dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    if not isinstance(data, _Array):
        raise _Bad("a parameter does not wrap a tensor")
    return data


def _latin1_encode(text, encoding="latin1"):
    """Protocol 2 spells bytes as _codecs.encode(str, 'latin1'); nothing else is allowed."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Bad("unexpected _codecs.encode call")
    return text.encode("latin1")


def _ordered_dict(*args):
    """What an OrderedDict is rebuilt as: a new plain dict (pickle fills it with SETITEMS), which has no __dict__
    for BUILD to write into. Pickle never passes arguments to it."""
    if args:
        raise _Bad("an OrderedDict is rebuilt with arguments, which an official EPD predictor never does")
    return {}


class _FunctionName(_Inert):
    """A training-code function a DyWeight snapshot names (its loss object's solver_stu / solver_tea): kept as its
    name, never resolved, imported or called (the walk gives it a call budget of 0)."""
    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name


class _StandIn(_Inert):
    """What find_class hands out for a function: an object, not the bare function, because pickle's BUILD
    opcode can set attributes (e.g. __defaults__) on a function and so corrupt it for the whole process."""
    __slots__ = ("func",)

    def __init__(self, func):
        self.func = func

    def __call__(self, *args):
        return self.func(*args)


_ALLOWED = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _StandIn(_reconstruct_persistent_obj),
    ("torch._utils", "_rebuild_parameter"): _StandIn(_rebuild_parameter),
    ("torch._utils", "_rebuild_tensor_v2"): _StandIn(_rebuild_tensor_v2),
    ("torch.storage", "_load_from_bytes"): _StandIn(_load_from_bytes),
    # torch modules' _parameters and hook dicts: a plain dict (ordered too). Not the OrderedDict class itself:
    # its instances have a __dict__, so BUILD could set an attribute such as `get` on one and shadow the method.
    ("collections", "OrderedDict"): _StandIn(_ordered_dict),
    ("torch.nn.modules.activation", "Sigmoid"): _Sigmoid,
    ("torch.nn.modules.activation", "Softmax"): _Softmax,
    # Protocols 2-3 spell sets (nn.Module._non_persistent_buffers_set) and protocol 2 bytes as calls;
    # the official files use protocol 4, which needs neither.
    ("builtins", "set"): set, ("__builtin__", "set"): set,
    ("_codecs", "encode"): _StandIn(_latin1_encode),
    # the training-code functions other formats' snapshots name (formats.py, e.g. DyWeight's student and teacher)
    **{(f.PICKLE_MODULE, n): _FunctionName(n) for f in FORMATS for n in getattr(f, "PICKLE_FUNCTIONS", ())},
}
# Classes handed out (the placeholders above, set) are safe from BUILD: ours define __setstate__, which pickle
# then calls unbound and which fails; built-in types refuse new attributes.


# The authors' older branch (EPD-Solver, for EDM pixel-space models such as CIFAR-10) pickles its training
# snapshot with the loss object, whose attributes name the training code's solver functions (e.g.
# solvers.epd_sampler). Such a file is recognised by that global and refused with a message saying what it is.
_OLD_BRANCH_MODULES = ("solvers", "solvers_amed")  # after the formats' own names (_ALLOWED)
_FIX_OLD_BRANCH = ("Nothing in it was run. The EPD-Solver++ predictors for Stable Diffusion 1.5, SD3 and Flux import "
                   "directly, e.g. python -m epd_core.import_official --official sd15-best OUT.safetensors; for "
                   "other models, train a table with the EPD Trainer node or python -m epd_core.train.")


class _OldBranch(_Refused):
    """A snapshot from the authors' older EPD-Solver branch (recognised by its solver function globals)."""


def _check_global(module: str, name: str):
    """The stand-in for an allowed global; any other name raises _Refused (or _OldBranch) without importing it."""
    try:
        return _ALLOWED[(module, name)]
    except (KeyError, TypeError):
        pass
    if module in _OLD_BRANCH_MODULES and name.endswith("_sampler"):  # never resolved, never imported
        raise _OldBranch(f"this is a predictor from the EPD authors' older EPD-Solver branch, for EDM "
                         f"pixel-space models such as CIFAR-10 (its training snapshot names the solver "
                         f"function '{module}.{name}'); no ComfyUI model uses those predictors, so it is "
                         f"not imported")
    module, name = str(module)[:100], str(name)[:100]
    raise _Refused(f"refused: the pickle asks for the Python global '{module}.{name}', which the EPD "
                   f"predictors this importer reads never contain")


class _Hooks(Hooks):
    """What the outer pickle's globals, calls and BUILDs become in our evaluator (epd_core/tables/torch_storage.py,
    which
    replaces pickle's unpickler: no byte of the file reaches pickle.load / pickle.loads)."""
    passthrough = (_Bad,)

    def find(self, module, attr):
        return _check_global(module, attr)

    def call(self, func, args, op):
        if op == "REDUCE":  # what pickle does: func(*args); func is a stand-in, a placeholder class or set
            return func(*args)
        if not isinstance(func, type):  # NEWOBJ: cls.__new__(cls, *args), as pickle does
            raise _Refused(f"refused: the pickle creates an object with {op} from a {type(func).__name__}")
        return func.__new__(func, *args)

    def build(self, target, state):
        setstate = getattr(target, "__setstate__", None)  # ours refuse, or keep a module's dict as data
        if setstate is None:
            raise _Refused(f"refused: the pickle sets attributes of a {type(target).__name__}, which an official "
                           "EPD predictor never does")
        setstate(state)

    def persistent(self, pid):
        # plain pickle.dump writes no persistent ids (torch's own ids live inside the storage bytes)
        raise _Refused("refused: the pickle uses a persistent id, which an official EPD predictor never contains")


_OUTER_LIMITS = Limits(opcodes=PICKLE_MAX_OPCODES, depth=PICKLE_MAX_DEPTH, items=PICKLE_MAX_ITEMS,
                       key_chars=PICKLE_MAX_KEY_CHARS)


def _check_magic(data: bytes, fail) -> None:
    """Recognise common wrong files early, with a message that says what they are."""
    if not data:
        fail("the file is empty", "Download the predictor again.")
    if data[:4] == b"PK\x03\x04":
        fail("this is a zip archive (e.g. a torch.save checkpoint), not an official EPD predictor pickle")
    if len(data) > 9 and data[8:10] == b'{"':
        fail("this looks like a safetensors file, not an official .pkl",
             "If it is an EPD table, load it directly with the EPD parameter loader; no conversion is needed.")
    if data[0] != pickle.PROTO[0] or len(data) < 2 or not 2 <= data[1] <= pickle.HIGHEST_PROTOCOL:
        fail("this is not a pickle of protocol 2 or newer, so not an official EPD predictor file")


def _prescan(data: bytes, fail) -> None:
    """Run the opcode stream on abstract values before anything is built (_Walk): one complete pickle, no
    persistent ids, sane memo indices (CPython's C unpickler pre-allocates its memo up to the largest index it
    sees), only allowed globals, and every budget in PICKLE_BUDGETS."""
    try:
        end = _Walk(fail).run(data)
    except Refusal:
        raise
    except _OldBranch as e:
        fail(str(e), _FIX_OLD_BRANCH)
    except _Refused as e:
        fail(str(e), _FIX_REFUSED)
    except Exception as e:  # noqa: BLE001 - genops raises ValueError mostly, but corrupt input may do more
        fail(f"the file is truncated or corrupt ({_first_line(e)})", "Download the predictor again.")
    if end != len(data):
        fail(f"{len(data) - end} unexpected bytes follow the end of the pickle", "Download the predictor again.")


# ---- the opcode walk: budgets checked before the restricted unpickler builds anything --------------------
class _Val:
    """What the walk knows about one value the unpickler would build: its kind, nesting depth, number of items,
    literal value (small ints and strings, tuples of ints), and whether it is already an item of another
    value (then it may no longer be changed: real pickles fill a container before they use it)."""
    __slots__ = ("kind", "depth", "size", "value", "used", "strs")

    def __init__(self, kind, depth=0, size=0, value=None, strs=True):
        self.kind, self.depth, self.size, self.value, self.used, self.strs = kind, depth, size, value, False, strs


_SCALARS = {"NONE": "none", "NEWTRUE": "bool", "NEWFALSE": "bool", "FLOAT": "float", "BINFLOAT": "float"}
_INTS = ("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4")
_STRS = ("STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8")
_BYTES = ("BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8")
_EMPTY = {"EMPTY_LIST": "list", "EMPTY_DICT": "dict", "EMPTY_TUPLE": "tuple", "EMPTY_SET": "set"}
_FROM_MARK = {"LIST": "list", "TUPLE": "tuple", "DICT": "dict", "FROZENSET": "frozenset"}
_IGNORED = ("PROTO", "FRAME", "STOP")
# what each allowed global's call returns, for the walk
_CALL_KINDS = {"torch_utils.persistence._reconstruct_persistent_obj": "record",
               "torch._utils._rebuild_parameter": "tensor", "torch._utils._rebuild_tensor_v2": "tensor",
               "torch.storage._load_from_bytes": "storage", "collections.OrderedDict": "dict",
               "torch.nn.modules.activation.Sigmoid": "module", "torch.nn.modules.activation.Softmax": "module",
               "builtins.set": "set", "__builtin__.set": "set", "_codecs.encode": "bytes"}


class _Walk:
    """Runs the opcode stream on abstract values (pickletools.genops; nothing is built) and refuses the file as
    soon as it exceeds one of the PICKLE_MAX_* budgets. Every refusal names the budget."""

    def __init__(self, fail):
        self.fail = fail
        self.stack, self.marks, self.memo = [], [], {}
        self.calls: dict[str, int] = {}
        self.claimed = 0  # bytes that calls may allocate: storages, tensor views, encoded bytes

    def over(self, what: str, budget: str):
        self.fail(f"refused: the pickle {what} (budget: {budget})", _FIX_BUDGET)

    def pop(self, n=1):
        if len(self.stack) - (self.marks[-1] if self.marks else 0) < n:
            self.fail("the pickle's opcodes do not fit together (stack underflow; corrupt or crafted)",
                      "Download the predictor again.")
        items = self.stack[len(self.stack) - n:]
        del self.stack[len(self.stack) - n:]
        return items

    def pop_mark(self):
        if not self.marks:
            self.fail("the pickle's opcodes do not fit together (no MARK; corrupt or crafted)",
                      "Download the predictor again.")
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def top(self):
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            self.fail("the pickle's opcodes do not fit together (stack underflow; corrupt or crafted)",
                      "Download the predictor again.")
        return self.stack[-1]

    def nest(self, v: _Val, items) -> _Val:
        """`items` become part of `v`: depth and size budgets, and the items may no longer change."""
        for item in items:
            item.used = True
            if item.depth + 1 > v.depth:
                v.depth = item.depth + 1
            if not (item.kind == "str" and item.size <= PICKLE_MAX_KEY_CHARS):
                v.strs = False
        v.size += len(items)
        if v.depth > PICKLE_MAX_DEPTH:
            self.over(f"nests objects more than {PICKLE_MAX_DEPTH} levels deep", "nesting depth "
                      f"{PICKLE_MAX_DEPTH}; a deep tuple used as a key or set item crashes Python's hashing")
        if v.size > PICKLE_MAX_ITEMS:
            self.over(f"builds a {v.kind} of more than {PICKLE_MAX_ITEMS} items",
                      f"{PICKLE_MAX_ITEMS} items per container")
        return v

    def keys(self, v: _Val, items, keyed: bool):
        keys = items[0::2] if keyed else items
        if keyed and len(items) % 2:
            self.fail("the pickle's opcodes do not fit together (odd number of dict items; corrupt or crafted)",
                      "Download the predictor again.")
        for k in keys:
            if not (k.kind == "str" and k.size <= PICKLE_MAX_KEY_CHARS):
                what = "long string" if k.kind == "str" else k.kind
                self.over(f"uses {'an' if what[0] in 'aeiou' else 'a'} {what} as a "
                          f"{'dict key' if keyed else 'set item'}", f"{'dict keys' if keyed else 'set items'} are "
                          f"strings of at most {PICKLE_MAX_KEY_CHARS} characters")
        return self.nest(v, items)

    def mutate(self, target: _Val, kinds, op: str, items) -> _Val:
        for item in items:  # first: a container added to itself is then already used
            item.used = True
        if target.kind not in kinds:
            self.fail(f"refused: the pickle applies {op} to a {target.kind}, which an official EPD predictor never "
                      "does", _FIX_REFUSED)
        if target.used:
            self.over(f"changes a {target.kind} after using it ({op})", "containers are complete before use; "
                      "this is how shared references and cycles are built")
        return target

    def call(self, func: _Val, args: _Val, op: str) -> _Val:
        if func.kind != "global":
            self.fail(f"refused: the pickle calls a {func.kind} ({op}), which an official EPD predictor never does",
                      _FIX_REFUSED)
        name = func.value
        self.count(name, op)
        kind = _CALL_KINDS[name]
        if args.kind != "tuple":
            self.fail(f"refused: the pickle calls {name} with a {args.kind} of arguments", _FIX_REFUSED)
        items = args.value if isinstance(args.value, list) else []
        result = _Val(kind, depth=args.depth)
        if name == "torch.storage._load_from_bytes" and items and items[0].kind == "bytes":
            self.claim(items[0].size, name)
        elif name == "_codecs.encode" and items and items[0].kind == "str":
            self.claim(items[0].size, name)
        elif name == "torch._utils._rebuild_tensor_v2":
            size = _literal_ints(items[2]) if len(items) > 2 else None
            if size is None or len(size) > 8 or any(n < 0 for n in size):
                self.fail("a tensor's shape is not a tuple of at most 8 integers", "The file is damaged or not an "
                          "official EPD predictor; download it again.")
            self.claim(math.prod(size) * 8, f"a tensor view of shape {size}")
        elif name in ("builtins.set", "__builtin__.set") and items:
            if not (len(items) == 1 and items[0].kind in ("list", "tuple") and items[0].strs):
                self.over("builds a set from items that are not short strings",
                          f"set items are strings of at most {PICKLE_MAX_KEY_CHARS} characters")
        self.nest(result, [args])
        if kind == "bytes":  # what the walk knows of bytes is their length
            result.size = items[0].size if items and items[0].kind == "str" else 0
        else:
            result.size = 0  # a call's result starts empty (OrderedDict, set) or holds no items
        return result

    def count(self, name: str, op: str):
        key = f"{name} {op}"
        self.calls[key] = self.calls.get(key, 0) + 1
        limit = PICKLE_MAX_CALLS.get(name, 0) if op != "BUILD" else PICKLE_MAX_BUILDS
        if self.calls[key] > limit:
            self.over(f"calls {name} ({op}) more than {limit} times", f"{limit} {op} calls of {name}")

    def claim(self, nbytes: int, what: str):
        self.claimed += nbytes
        if self.claimed > PICKLE_MAX_TENSOR_BYTES:
            self.over(f"claims more than {PICKLE_MAX_TENSOR_BYTES} bytes of tensor data (reached at {what})",
                      f"{PICKLE_MAX_TENSOR_BYTES} bytes of tensor data in all")

    def run(self, data: bytes):
        fail, stack, memo = self.fail, self.stack, self.memo
        count, end = 0, 0
        for op, arg, pos in pickletools.genops(io.BytesIO(data)):
            count += 1
            if count > PICKLE_MAX_OPCODES:
                self.over(f"has more than {PICKLE_MAX_OPCODES} opcodes", f"{PICKLE_MAX_OPCODES} opcodes")
            name = op.name
            end = pos + 1  # the last opcode genops yields is STOP, one byte long
            if name in _IGNORED:
                continue
            if name in _SCALARS:
                stack.append(_Val(_SCALARS[name]))
            elif name in _INTS:
                stack.append(_Val("int" if type(arg) is int else "bool", value=arg))
            elif name in _STRS:
                stack.append(_Val("str", size=len(arg), value=arg if len(arg) <= PICKLE_MAX_KEY_CHARS else None))
            elif name in _BYTES:
                stack.append(_Val("bytes", size=len(arg)))
            elif name in _EMPTY:
                stack.append(_Val(_EMPTY[name]))
            elif name in _FROM_MARK:
                items, v = self.pop_mark(), _Val(_FROM_MARK[name])
                if name == "TUPLE":
                    v.value = items
                stack.append(self.keys(v, items, True) if name == "DICT" else
                             self.keys(v, items, False) if name == "FROZENSET" else self.nest(v, items))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                items = self.pop(int(name[-1]))
                stack.append(self.nest(_Val("tuple", value=items), items))
            elif name == "MARK":
                if len(self.marks) >= PICKLE_MAX_DEPTH:
                    self.over(f"opens more than {PICKLE_MAX_DEPTH} nested MARKs", f"nesting depth "
                              f"{PICKLE_MAX_DEPTH}")
                self.marks.append(len(stack))
            elif name == "POP":
                if self.marks and self.marks[-1] == len(stack):
                    self.marks.pop()
                else:
                    self.pop()
            elif name == "POP_MARK":
                self.pop_mark()
            elif name == "DUP":
                stack.append(self.top())
            elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                if name == "MEMOIZE":
                    arg = len(memo)
                elif not (isinstance(arg, int) and 0 <= arg <= count):
                    fail(f"the pickle uses memo index {arg} at byte {pos}, impossible in a real file (corrupt or "
                         "crafted)", "Download the predictor again.")
                memo[arg] = self.top()
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                if arg not in memo:
                    fail(f"the pickle reads memo index {arg} at byte {pos}, which was never stored (corrupt or "
                         "crafted)", "Download the predictor again.")
                stack.append(memo[arg])
            elif name in ("APPEND", "APPENDS"):
                items = self.pop() if name == "APPEND" else self.pop_mark()
                self.nest(self.mutate(self.top(), ("list",), name, items), items)
            elif name in ("SETITEM", "SETITEMS"):
                items = self.pop(2) if name == "SETITEM" else self.pop_mark()
                self.keys(self.mutate(self.top(), ("dict",), name, items), items, True)
            elif name == "ADDITEMS":
                items = self.pop_mark()
                self.keys(self.mutate(self.top(), ("set",), name, items), items, False)
            elif name in ("GLOBAL", "STACK_GLOBAL"):
                if name == "GLOBAL":
                    module, _, attr = str(arg).partition(" ")
                else:
                    m, a = self.pop(2)
                    module, attr = m.value, a.value
                    if not (isinstance(module, str) and isinstance(attr, str)):
                        fail("refused: the pickle names a global with something other than two short strings",
                             _FIX_REFUSED)
                _check_global(module, attr)
                stack.append(_Val("global", value=f"{module}.{attr}"))
            elif name == "REDUCE":
                func, args = self.pop(2)
                stack.append(self.call(func, args, "REDUCE"))
            elif name in ("NEWOBJ", "NEWOBJ_EX"):
                func, args = self.pop(2) if name == "NEWOBJ" else self.pop(3)[:2]
                if func.kind != "global" or _CALL_KINDS[func.value] not in ("module", "set"):
                    fail(f"refused: the pickle creates an object with {name} from a "
                         f"{func.value if func.kind == 'global' else func.kind}, which an official EPD predictor "
                         "never does", _FIX_REFUSED)
                stack.append(self.call(func, args, name))
            elif name == "BUILD":
                state, = self.pop()
                target = self.mutate(self.top(), ("module",), "BUILD", [state])
                self.count("torch.nn module", "BUILD")
                self.nest(target, [state])
            elif name in ("PERSID", "BINPERSID"):
                fail("refused: the pickle uses a persistent id, which an official EPD predictor never contains",
                     _FIX_REFUSED)
            else:  # INST, OBJ, EXT1/2/4, NEXT_BUFFER, READONLY_BUFFER and anything newer
                if name == "INST":  # names its class like GLOBAL: say which, if it is a forbidden one
                    _check_global(*str(arg).partition(" ")[::2])
                fail(f"refused: the pickle uses the opcode {name}, which an official EPD predictor never contains",
                     _FIX_REFUSED)
        return end


def _literal_ints(v: _Val):
    """The integers of a tuple written literally in the pickle (as torch writes shapes), else None."""
    if v.kind != "tuple":
        return None
    items = v.value or []
    if not all(x.kind == "int" for x in items):
        return None
    return tuple(x.value for x in items)


# ---- provenance: a bounded copy of untrusted attributes -----------------------------------------------------
# What the provenance copy of untrusted attributes may hold in all (values and characters): a real file's
# provenance is a few dozen values. Shared references can make a 4 kB pickle describe a graph of 10^10 nodes, so
# the copy counts every value it visits and refuses the file as soon as the budget is spent.
PROVENANCE_MAX_VALUES, PROVENANCE_MAX_CHARS, PROVENANCE_MAX_DEPTH = 2000, 20000, 4
_MAX_EXACT_INT = 2 ** 53  # larger integers are no plausible hyperparameter (and overflow float())


class _TooBig(Exception):
    """The provenance copy ran out of budget."""


class _Budget:
    def __init__(self, values: int = PROVENANCE_MAX_VALUES, chars: int = PROVENANCE_MAX_CHARS):
        self.values, self.chars = values, chars

    def spend(self, attr: str, values: int = 1, chars: int = 0) -> None:
        self.values -= values
        self.chars -= chars
        if self.values < 0 or self.chars < 0:
            raise _TooBig(f"refused: attribute '{attr}' (with the other recorded hyperparameters) holds more than "
                          f"{PROVENANCE_MAX_VALUES} values or {PROVENANCE_MAX_CHARS} characters")


def _plain(v, budget: _Budget, attr: str, depth: int = 0):
    """JSON-safe copy of an untrusted value for the provenance: bounded depth and length per container, and a
    global budget of values and characters shared by every call with the same `budget` (see _Budget)."""
    budget.spend(attr)
    if v is None or type(v) is bool or (type(v) is float and math.isfinite(v)):
        return v
    if type(v) is int:
        return v if abs(v) <= _MAX_EXACT_INT else "<int too large>"
    if type(v) is float:
        return str(v)
    if type(v) is str:
        budget.spend(attr, 0, min(len(v), 200))
        return v[:200]
    if depth < PROVENANCE_MAX_DEPTH and type(v) in (list, tuple):
        return [_plain(x, budget, attr, depth + 1) for x in v[:64]]
    if depth < PROVENANCE_MAX_DEPTH and type(v) is dict and all(type(k) is str for k in v):
        out = {}
        for k, x in list(v.items())[:64]:
            budget.spend(attr, 0, min(len(k), 100))
            out[k[:100]] = _plain(x, budget, attr, depth + 1)
        return out
    return f"<{type(v).__name__.strip('_')}>"
