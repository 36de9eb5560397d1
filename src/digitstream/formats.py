"""The names of the payload formats, for the command line and the codecs alike.

Kept free of heavy imports: ``digitstream --help`` reads them.
"""

#: what ``send --format`` writes and ``run --input-format`` reads (:mod:`digitstream.codecs.inputs`)
INPUT_FORMATS = ("pickle", "npy", "u8", "f32", "f64", "json")
#: ``run --input-format`` also takes ``auto``: the seed's pickles, .npy and JSON, told apart
#: per payload
AUTO = "auto"
RUN_INPUT_FORMATS = (AUTO, *INPUT_FORMATS)
#: raw pixel formats and the NumPy type of one value
RAW_DTYPE_NAMES = {"u8": "u1", "f32": "<f4", "f64": "<f8"}
#: what ``run --output-format`` writes (see :mod:`digitstream.codecs.outputs`)
OUTPUT_FORMATS = ("text", "json")
