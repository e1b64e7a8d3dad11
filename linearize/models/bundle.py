"""The flat source bundle written into an export so it loads with plain transformers and
`trust_remote_code=True`, without linearize installed.

transformers copies the `auto_map` module and, recursively, the sibling files it imports as
`from .name import ...` — flat files only, no sub-packages. So every linearize module the modeling
code needs (found by following relative imports from `linearize.models.hf`, those inside functions
included) is written as one file named after its dotted path (`linearize.ops.linear_attn.naive` →
`lz_ops_linear_attn_naive.py`), and its relative imports are rewritten to those flat names.

The Triton kernel modules are listed in `KERNEL_MODULES`. Each op imports its kernels lazily (`load_triton`,
a relative import inside a function), which is what makes transformers copy them out of an export; the
bundler refuses to write a bundle that does not reach every listed kernel module that way."""
from __future__ import annotations

from ..files import write_text

import ast
import importlib.util
import re
from pathlib import Path

PACKAGE = "linearize"
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
ENTRY_MODULE = "linearize.models.hf"
# The Triton kernels an export ships. The ops import them only when a call runs on Triton.
KERNEL_MODULES = (
    "linearize.ops.gated_delta_rule.triton",
    "linearize.ops.gated_linear_attn.triton",
    "linearize.ops.linear_attn.triton",
    "linearize.ops.window_linear_attn.triton",
)
MODELING_FILE = "modeling_linearize.py"
MODELING_MODULE = MODELING_FILE.removesuffix(".py")
FLAT_PREFIX = "lz_"
RELATIVE_IMPORT = re.compile(r"from\s+\.+[\w.]*\s+import")


def module_file(name: str) -> Path:
    """The source file of a linearize module (a package's `__init__.py`)."""
    parts = name.split(".")[1:]
    package_init = PACKAGE_ROOT.joinpath(*parts, "__init__.py")
    return package_init if package_init.is_file() else PACKAGE_ROOT.joinpath(*parts).with_suffix(".py")


def is_package(name: str) -> bool:
    return module_file(name).name == "__init__.py"


def flat_name(name: str) -> str:
    """`linearize.ops.linear_attn.naive` → `lz_ops_linear_attn_naive`; the entry module is the modeling file."""
    if name == ENTRY_MODULE:
        return MODELING_MODULE
    return FLAT_PREFIX + "_".join(name.split(".")[1:])


def _absolute(node: ast.ImportFrom, current: str) -> str:
    """The absolute module a `from ... import` names, seen from module `current`."""
    if node.level == 0:
        return node.module or ""
    package = current if is_package(current) else current.rpartition(".")[0]
    if node.module is None:
        raise ValueError(f"{current}: `from {'.' * node.level} import ...` cannot be bundled; name the module")
    return importlib.util.resolve_name("." * node.level + node.module, package)


def _linearize_imports(source: str, current: str) -> list[tuple[ast.ImportFrom, str]]:
    """Every `from X import ...` of `current` whose X is a linearize module, with X made absolute."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            target = _absolute(node, current)
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                found.append((node, target))
        elif isinstance(node, ast.Import) and any(a.name.split(".")[0] == PACKAGE for a in node.names):
            raise ValueError(f"{current}: `import {PACKAGE}...` cannot be bundled; use a relative import")
    return found


def _rewrite(source: str, imports: list[tuple[ast.ImportFrom, str]]) -> str:
    """Replace the `from <module> import` head of each linearize import with its flat sibling name."""
    lines = source.splitlines(keepends=True)
    for node, target in imports:
        line = lines[node.lineno - 1]
        head = re.compile(rf"from\s+[\w.]*{re.escape(node.module or '')}\s+import") if node.level == 0 else RELATIVE_IMPORT
        new_line, count = head.subn(f"from .{flat_name(target)} import", line, count=1)
        if count != 1:
            raise ValueError(f"cannot rewrite the import on line {node.lineno}: {line.strip()!r}")
        lines[node.lineno - 1] = new_line
    return "".join(lines)


def collect_modules(entry: str = ENTRY_MODULE, kernels: tuple[str, ...] = KERNEL_MODULES) -> dict[str, str]:
    """{flat file name: rewritten source} for `entry` and every linearize module it reaches; ValueError
    when a module of `kernels` is not among them (transformers copies only what relative imports reach
    from the modeling file, so the export would run without it)."""
    pending, sources = [entry], {}
    while pending:
        name = pending.pop()
        if name in sources:
            continue
        source = module_file(name).read_text()
        imports = _linearize_imports(source, name)
        sources[name] = _rewrite(source, imports)
        pending.extend(target for _, target in imports if target != PACKAGE)
    unreached = [name for name in kernels if name not in sources]
    if unreached:
        raise ValueError(f"no relative import from {entry} reaches the kernel modules {unreached}: an export "
                         f"would not carry them")
    return {f"{flat_name(name)}.py": text for name, text in sources.items()}


def write_bundle(out_dir: Path) -> list[str]:
    """Writes the modeling file and its flat siblings into `out_dir`; returns the file names."""
    files = collect_modules()
    for file_name, text in files.items():
        write_text(Path(out_dir) / file_name, text)
    return sorted(files)
