"""Parameter tables: the safetensors format (params.py), atomic file writes (fileio.py) and the importers of
published tables (import_official.py, import_dyweight.py), whose pickles are read by a bounded walk
(predictor_pickle.py, torch_storage.py) in an isolated child (import_child.py), never unpickled."""
