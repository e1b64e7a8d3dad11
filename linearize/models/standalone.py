"""The opening of a script that checks an export the way a user without linearize loads it: run in a
fresh interpreter (`python -I`), it makes `linearize` and the runners unimportable (an editable install
puts them on every path, so -I alone cannot hide them) and stops if linearize can still be imported.
The export tests and bench/native_export.py append their own checks to it."""
from __future__ import annotations

BLOCK_LINEARIZE = '''
import importlib.abc
import sys


class _Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("linearize", "stages"):
            raise ImportError(name + " is blocked in the standalone check")
        return None


sys.meta_path.insert(0, _Refuse())
try:
    import linearize  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("linearize is importable in the standalone check")
'''
