"""The result layout's shared names: dtypes and metadata (the format is described in
``safehub/_results.py``). Standard library only; both sides import it, the worker's encoders
(``weights.py``, ``objects.py``) and the parent's decoder.
"""

# Format dtype name -> (torch dtype name, item size in bytes): the allow-list of both sides.
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
# torch dtype name -> format dtype name.
DTYPE_NAMES: dict[str, str] = {torch_name: name for name, (torch_name, _) in DTYPES.items()}

WEIGHTS_METADATA = {"format": "pt"}
OBJECT_FORMAT = "safehub-object"
OBJECT_METADATA = {"format": OBJECT_FORMAT}
PICKLE_ENTRY = "pickle"
