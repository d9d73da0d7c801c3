"""Builds pickles with the structure of the EPD authors' official predictor files, for the importer tests.

No torch_utils package is involved: the persistence hook (and any forbidden global a malicious test wants) is
a `FakeGlobal` that `OfficialPickler` writes as a bare GLOBAL opcode, exactly as pickle writes a real function.
Everything else goes through torch's own pickling, so tensors, parameters, storages (bytes given to
torch.storage._load_from_bytes) and torch.nn modules come out byte-for-byte as torch writes them.
"""
from __future__ import annotations

import collections
import io
import pickle

import torch

OFFICIAL_NAMES = ("r_params", "weight_s", "scale_dir_params", "scale_time_params")


class FakeGlobal:
    """A name the unpickler will be asked to resolve; never importable (and never called) here."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle requires reduce functions to be callable
        raise RuntimeError("FakeGlobal is a pickling stand-in only")


class FakeCall:
    """Pickles as the call `func(*args)` (GLOBAL + args + REDUCE)."""

    def __init__(self, func, args: tuple):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


PERSISTENCE_HOOK = FakeGlobal("torch_utils.persistence", "_reconstruct_persistent_obj")


class OfficialPickler(pickle._Pickler):
    """The pure-Python pickler (its dispatch table is a plain dict we can extend) plus FakeGlobal support.
    `storage_reduce`, when given, replaces how torch storages are written (e.g. zip format, malicious bytes)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file, protocol, storage_reduce=None):
        super().__init__(file, protocol)
        if storage_reduce is not None:
            self.dispatch_table = {torch.storage.TypedStorage: storage_reduce}

    def _save_fake_global(self, obj):
        if self.proto >= 4:  # what pickle writes for a real global at these protocols
            self.save(obj.module)
            self.save(obj.name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[FakeGlobal] = _save_fake_global


def random_tables(num_steps: int = 11, num_points: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Official parameter tensors, (num_steps - 1) x K: num_steps counts time points."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(num_steps - 1, num_points, generator=g) for n in OFFICIAL_NAMES}


def sd15_attrs(**overrides) -> dict:
    """The attributes of the published SD1.5 predictor (num_steps 11, K 2, discrete rho 1, CFG 7.5, DPM teacher)."""
    attrs = dict(num_steps=11, num_points=2, sampler_stu="epd", sampler_tea="dpm", M=1, guidance_type="cfg",
                 guidance_rate=7.5, schedule_type="discrete", schedule_rho=1.0, afs=False, scale_dir=0.05,
                 scale_time=0.05, max_order=None, predict_x0=True, lower_order_final=True, fcn=True, alpha=10.0,
                 backend="ldm", backend_config={"resolution": 512, "prompt_path": "MS-COCO_val2014_30k.csv"},
                 dataset_name="ms_coco", img_resolution=64)
    attrs.update(overrides)
    return attrs


def predictor_state(tables: dict, attrs: dict) -> dict:
    """The __dict__ of an EPD_predictor module: torch.nn.Module internals, parameters, attributes."""
    module = torch.nn.Module()
    for name, t in tables.items():
        module.register_parameter(name, torch.nn.Parameter(t.clone()))
    module.sigmoid = torch.nn.Sigmoid()
    module.softmax = torch.nn.Softmax(dim=1)
    state = dict(module.__dict__)
    # torch < 2.2 (what the authors trained with) kept these as OrderedDicts
    state["_parameters"] = collections.OrderedDict(state["_parameters"])
    state["_modules"] = collections.OrderedDict(state["_modules"])
    state.update(attrs)
    state["_init_args"] = ()
    state["_init_kwargs"] = dict(attrs)
    return state


def persistent_model(state: dict, class_name: str = "EPD_predictor", module_src: str | None = None) -> FakeCall:
    meta = dict(type="class", version=6, module_src=module_src or "class EPD_predictor:\n    pass\n",
                module_name="training.networks", class_name=class_name, state=state)
    return FakeCall(PERSISTENCE_HOOK, (meta,))


def official_pickle(tables: dict | None = None, attrs: dict | None = None, protocol: int = 4,
                    storage_reduce=None, module_src: str | None = None, class_name: str = "EPD_predictor",
                    top: dict | None = None) -> bytes:
    """A complete official-style file: pickle of {'model': <persistent EPD_predictor>} (plus `top` entries,
    which may replace 'model')."""
    tables = random_tables() if tables is None else tables
    attrs = sd15_attrs() if attrs is None else attrs
    data = {"model": persistent_model(predictor_state(tables, attrs), class_name, module_src)}
    data.update(top or {})
    buf = io.BytesIO()
    OfficialPickler(buf, protocol, storage_reduce).dump(data)
    return buf.getvalue()


def zip_storage_reduce(storage):
    """Write storages as torch zip archives instead of torch's default legacy format."""
    buf = io.BytesIO()
    torch.save(storage, buf)
    return torch.storage._load_from_bytes, (buf.getvalue(),)


def fixed_bytes_storage_reduce(payload: bytes):
    """Every storage becomes `payload` (e.g. a malicious pickle)."""
    return lambda storage: (torch.storage._load_from_bytes, (payload,))


def old_branch_pickle(tables: dict | None = None, protocol: int = 4) -> bytes:
    """A training snapshot as the authors' older EPD-Solver branch (EDM pixel-space models such as CIFAR-10)
    writes it: {'model': <persistent EPD_predictor>, 'loss_fn': <persistent loss>}, the loss holding the training
    code's solver functions (solvers.epd_sampler, solvers.dpm_2_sampler) as plain globals."""
    tables = random_tables(num_steps=5, num_points=2, seed=3) if tables is None else tables
    attrs = sd15_attrs(num_steps=5, sampler_tea="dpm", schedule_type="polynomial", schedule_rho=7.0, fcn=False,
                       backend=None, backend_config=None, dataset_name="cifar10", img_resolution=32,
                       guidance_type=None, guidance_rate=None)
    for key in ("backend", "backend_config"):  # the older predictor has no backend attributes
        attrs.pop(key)
    loss_state = dict(num_steps=5, solver_stu=FakeGlobal("solvers", "epd_sampler"),
                      solver_tea=FakeGlobal("solvers", "dpm_2_sampler"), M=3, schedule_type="polynomial",
                      schedule_rho=7.0, afs=False, max_order=None, sigma_min=0.002, sigma_max=80.0)
    loss_meta = dict(type="class", version=6, module_src="class EPD_loss:\n    pass\n",
                     module_name="training.loss", class_name="EPD_loss", state=loss_state)
    return official_pickle(tables, attrs, protocol, top={"loss_fn": FakeCall(PERSISTENCE_HOOK, (loss_meta,))})
