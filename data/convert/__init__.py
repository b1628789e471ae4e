"""Converters from raw formats to a dataset directory (``python -m data.convert``).

One module per format (``criteo``, ``movielens``, ``seqtxt``, ``csv``), each with
``add_arguments(parser)`` and ``convert(inputs, out, args) -> meta``; the shared writer,
hashing and text reading live in ``common`` and ``text``.
"""

FORMATS = ("criteo", "movielens", "seqtxt", "csv")
