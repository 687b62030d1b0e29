"""Code that runs inside the isolated worker (and, for ``hubconf``, in the parent too).

Every module here is standard library only, apart from torch and cloudpickle where the worker
needs them, and imports nothing of safehub's parent side: the worker loads these files by path,
not as ``safehub._worker``, so importing them never runs ``safehub/__init__.py`` in the sandbox.
"""
