"""The isolated importer's child process (epd_core/tables/import_official.py `import_official_isolated`): predictor
bytes on stdin, the table's safetensors bytes on stdout, a refusal as one marked JSON line on stderr.

It reads the file twice under the same address-space budget: first without torch (epd_core/tables/predictor_pickle.py,
pure Python + numpy), so a hostile file is refused in milliseconds instead of after torch's ~2 s start-up; then,
for a file that passed, with torch to build the table (the same parse again, then the conversion)."""
from __future__ import annotations

import json
import sys

MARK = "@@epd-import-error@@"
OUT_OF_MEMORY = 3
REFUSED = 2


def main(argv) -> int:
    source, name, memory = argv[0], argv[1], int(argv[2])
    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write into the table's bytes
    from epd_core.tables.predictor_pickle import MAX_PKL_BYTES, Refusal, failer, parse
    data = sys.stdin.buffer.read(MAX_PKL_BYTES + 1)
    try:
        limit_address_space(memory)
        parse(data, failer(source))  # torch-free: every refusal the parse can give happens here
        limit_address_space(None)  # torch maps a few GB of libraries on import
        import torch
        torch.set_num_threads(1)  # no thread pool (each thread reserves address space)
        limit_address_space(memory)
        from epd_core.tables.import_official import import_official_bytes
        payload = import_official_bytes(data, source=source, name=name).to_bytes()
    except Refusal as e:  # EPDImportError is one
        sys.stderr.write("\n" + MARK + json.dumps(str(e)) + "\n")
        return REFUSED
    except MemoryError:
        return OUT_OF_MEMORY
    out.write(payload)
    out.flush()
    return 0


def limit_address_space(extra: int | None) -> bool:
    """RLIMIT_AS (soft) = this process's size now + `extra` bytes, or lifted up to the hard limit for None; False
    where it cannot be set."""
    try:
        import resource
        with open("/proc/self/status") as f:
            size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (ImportError, OSError, StopIteration, ValueError):
        return False  # Windows (no `resource`), macOS (no /proc, and RLIMIT_AS is not enforced there)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if extra is None:
        limit = hard
    else:
        limit = size + extra if hard == resource.RLIM_INFINITY else min(size + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return True


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
