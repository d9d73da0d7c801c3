"""DyWeight's published tables (Westlake-AGI-Lab/DyWeight, arXiv 2603.11607) as an import format: the files by name,
what their pickles may name, the budget of their torch zip layout, and which parsed file is theirs. Torch-free (the
importer's isolated child reads this before it may import torch); the conversion is import_dyweight.py's.

FLUX.1-dev at NFE 3 / 5 / 7: dyweight_flux/checkpoints/dyweight_nfe*.pt (torch.save's zip layout, ~3 kB);
SD1.5 (MS-COCO, CFG 7.5) at 8 / 12 / 16 / 20 evaluations: exps/*/network-snapshot-000005.pkl (EDM persistence
pickles, ~16 kB), both from their repository at COMMIT. It has no license file: the numbers are never shipped, only
fetched by name and checked against the pinned SHA-256.
"""
from epd_core.tables.torch_storage import Limits

REPO = "Westlake-AGI-Lab/DyWeight"
COMMIT = "620534e32eab5235077a4a0545b8d59b7076fcec"
BASE_URL = f"https://raw.githubusercontent.com/{REPO}/{COMMIT}"
SUFFIXES = (".pkl", ".pt")  # what its files are named: EDM snapshots, torch.save zips
# (name, size in bytes, SHA-256, path in the repository)
PUBLISHED = (
    *((f"dyweight-flux-nfe{n}", size, sha, f"dyweight_flux/checkpoints/dyweight_nfe{n}.pt") for n, size, sha in (
        (3, 2662, "abf1bf591dce72b4316d0ff2c52e36afd7dca39e3a426b8ece38e78a17e83a78"),
        (5, 2918, "3aae083cfc9229b2abe703b43b8e6e565c3a2d6e58e1020aeccaedbecce71e5a"),
        (7, 3430, "436b83e51aa020e5194e7d1305702597029b4539118cd54f9409da7fcb30543a"))),
    *((f"dyweight-sd15-nfe{n}", size, sha, f"exps/{run}-mscoco-nfe{n}/network-snapshot-000005.pkl")
      for n, run, size, sha in (
        (8, "00036", 15599, "c594beace26d9bd6f4a1f2b9be298a1be0648d65da2ddf271258ea917521dd18"),
        (12, "00037", 15774, "1efdb43fe17ee39ac83f996b27f8671782bc65812318c38fb91885aa52846fb0"),
        (16, "00038", 16380, "095cb79b219ad7f272e2ccf5445083e802cb9d4b86424a6319af6f20d48f1d20"),
        (20, "00039", 16300, "f9d04587c675de6b1ef2b313dfe24761f0ea886343caf2aca4f4bf6fff1a1788"))),
)
# the sampler functions DyWeight's solvers.py defines: a snapshot's loss object names its student and teacher
# (kept as names, never resolved)
PICKLE_MODULE = "solvers"
PICKLE_FUNCTIONS = ("dyweight_sampler", "heun_sampler", "euler_sampler", "ipndm_sampler", "dpm_sampler",
                    "dpmpp_sampler", "unipc_sampler")
# a FLUX checkpoint's data.pkl has ~150 opcodes, 6 storages, 6 tensors, dicts of 5 entries, nesting 4
ZIP_LIMITS = Limits(opcodes=4000, depth=8, items=64, storages=16, tensors=16, pickle_bytes=64 * 1024)
FIX_ZIP = ("The file is not a DyWeight FLUX checkpoint (dyweight_nfe*.pt) or has been tampered with; nothing in it "
           "was run. Download it again.")


def recognises(top) -> bool:
    """A parsed file of this format: a torch zip (None: its FLUX checkpoints are the only zips imported), or an EDM
    snapshot {'predictor': ..., 'loss_fn': ...} (an EPD predictor file has a 'model' entry instead)."""
    return top is None or (isinstance(top, dict) and "predictor" in top and "model" not in top)


def convert(top, data: bytes, name: str, fail):
    """The dyweight table of a recognised file (torch is imported only now, after the torch-free parse passed)."""
    from epd_core.tables import import_dyweight
    if top is None:
        return import_dyweight.import_flux_pt(data, name, fail)
    return import_dyweight.import_snapshot(top, data, name, fail)
