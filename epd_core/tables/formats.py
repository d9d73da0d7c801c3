"""The published table formats the importer reads besides the EPD authors' own predictors (import_official.py), one
entry each. A format is a torch-free declaration module (its files by name and their suffixes, the function names its
pickles may hold, its torch zip budget, `recognises(parsed)` and `convert(parsed, data, name, fail)`) and its
converter; the bounded pickle reader (predictor_pickle.py), the importer and Import EPD Predictor read them here."""
from epd_core.tables import dyweight_format

FORMATS = (dyweight_format,)
# the file names Import EPD Predictor lists: the EPD authors' .pkl and every format's
SOURCE_SUFFIXES = tuple(dict.fromkeys((".pkl", *(s for f in FORMATS for s in f.SUFFIXES))))
