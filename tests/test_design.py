"""The layers of docs/design.md, checked against the code: every import of the library (module level or
inside a function) points down the layer table, peft and deepspeed each have one home, and an export
loads with the training stack, the runners and peft unimportable."""
from __future__ import annotations

import ast
import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import linearize
from linearize.config import AttentionConfig

from conftest import tiny_model

REPO = Path(__file__).resolve().parents[1]
# Lowest first: a unit may import its own layer or a lower one, never a higher one (docs/design.md).
LAYERS = (
    ("linearize.errors", "linearize.config", "linearize.dtypes", "linearize.files", "linearize.offline"),
    ("linearize.ops", "linearize.feature_maps"),
    ("linearize.attention",),
    ("linearize.surgery", "linearize"),
    ("linearize.adapters",),
    ("linearize.models",),
    ("linearize.data", "linearize.losses", "linearize.evals"),
    ("linearize.train",),
    ("stages",),
)
LAYER_OF = {unit: level for level, units in enumerate(LAYERS) for unit in units}
# `python -m linearize` is the command line's entry point: it belongs to the top layer.
ENTRY_POINTS = {"linearize/__main__.py": "stages"}
# The one module that may import each of these packages.
SOLE_IMPORTERS = {"peft": "linearize/adapters.py", "deepspeed": "linearize/train/distributed.py",
                  "omegaconf": "stages/config_loader.py"}  # the library receives frozen dataclasses


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path) -> list[str]:
    """Every module `path` imports, anywhere in the file, as absolute dotted names."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            if node.module:
                names.append(".".join(base + [node.module]))
            else:
                names += [".".join(base + [alias.name]) for alias in node.names]
    return names


def _unit(module: str) -> str:
    """The layer-table unit of a module: `linearize.<sub>` (or `linearize` itself), or its top package."""
    parts = module.split(".")
    if parts[0] != "linearize":
        return parts[0]
    return ".".join(parts[:2]) if len(parts) > 1 else "linearize"


def _files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def test_every_library_import_points_down_the_layers():
    upward = []
    for path in _files("linearize"):
        rel = path.relative_to(REPO).as_posix()
        here = ENTRY_POINTS.get(rel) or _unit(_module_name(path))
        for module in _imported(path):
            target = _unit(module)
            if target in LAYER_OF and LAYER_OF[target] > LAYER_OF[here]:
                upward.append(f"{rel} imports {module}")
    assert upward == []


def test_the_layer_table_names_every_library_unit():
    units = {_unit(_module_name(p)) for p in _files("linearize") if p.relative_to(REPO).as_posix() not in ENTRY_POINTS}
    assert units == {u for u in LAYER_OF if u != "stages"}


def test_peft_and_deepspeed_each_have_one_importer():
    importers = {package: set() for package in SOLE_IMPORTERS}
    for path in _files("linearize", "stages", "bench"):
        for module in _imported(path):
            if module.split(".")[0] in importers:
                importers[module.split(".")[0]].add(path.relative_to(REPO).as_posix())
    assert importers == {package: {home} for package, home in SOLE_IMPORTERS.items()}


# What code above surgery may take from linearize.attention: names and sizes, never a way to build or
# reach a mechanism (surgery is the only door: linearize_model, initial_students, the modes, calibration).
ATTENTION_NAMES_ABOVE_SURGERY = {"MECHANISMS", "mechanism_config_keys", "cache_nbytes", "StudentCache", "TransferPair",
                                 "available_mechanisms"}
# Below surgery (and surgery itself, and exports, which rebuild students to load them) may use the rest.
MECHANISM_USERS = ("linearize/attention/", "linearize/surgery/", "linearize/models/", "linearize/__init__.py")


def _attention_imports(path: Path) -> list[str]:
    """`module:name` for every name `path` imports from linearize.attention (or a module in it)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and \
                node.module.startswith("linearize.attention"):
            found += [f"{node.module}:{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level > 0 and (node.module or "").startswith("attention"):
            found += [f"..{node.module}:{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.startswith("linearize.attention")]
    return found


def test_training_code_reaches_mechanisms_only_through_surgery():
    """train/, losses/, data/, evals/, the runners and the benchmarks build, wrap and calibrate students only
    through linearize.surgery: no mechanism module, no build_mechanism or LinearizedAttention above it."""
    reaching = []
    for path in _files("linearize", "stages", "bench"):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith(MECHANISM_USERS):
            continue
        for item in _attention_imports(path):
            module, _, name = item.partition(":")
            if module.lstrip(".") not in ("linearize.attention", "attention") or name not in ATTENTION_NAMES_ABOVE_SURGERY:
                reaching.append(f"{rel} imports {item}")
    assert reaching == []


def test_bench_imports_no_runners_private_helpers():
    """Benchmarks time what the runners run through public names; a private helper is the runner's own."""
    private = []
    for path in _files("bench"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "stages":
                private += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_") \
                    and not node.attr.startswith("__") and node.value.id in _stage_modules_imported(path):
                private.append(f"{path.name}: {node.value.id}.{node.attr}")
    assert private == []


def _stage_modules_imported(path: Path) -> set[str]:
    """Local names bound to runner modules in `path` (`from stages import compare`, `import stages.x as y`)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "stages":
            names |= {alias.asname or alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {alias.asname or alias.name for alias in node.names if alias.name.startswith("stages")}
    return names


def _run_directory_names() -> set[str]:
    """The file and folder names stages/rundir.py declares for a run and a compare folder."""
    import stages.rundir as rundir

    # File names (with a suffix, or DONE): folder names such as "export" or "teacher" are also stage names
    # and dictionary keys, so a plain string match cannot tell a spelled path from them.
    return {value for name, value in vars(rundir).items() if name.isupper() and isinstance(value, str)
            and (value == rundir.DONE_FILE or ("." in value.strip(".") and " " not in value))}


def test_no_runner_or_benchmark_spells_a_run_directory_name():
    """Runners and benchmarks reach a run's files through stages.rundir (RunDir/StageDir/CompareDir): a
    renamed file is then renamed everywhere, and no second spelling can drift."""
    names, spelled = _run_directory_names(), []
    for path in _files("stages", "bench"):
        if path.name == "rundir.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                spelled.append(f"{path.relative_to(REPO).as_posix()}:{node.lineno} {node.value!r}")
    assert spelled == []


# A finder that lets a blocked package be found (libraries probe with find_spec to see what is
# installed) but fails when it is actually imported.
BLOCKED_IMPORT = textwrap.dedent("""
    import importlib.abc, importlib.machinery, sys

    BLOCKED = {blocked!r}

    class Refuse(importlib.abc.Loader):
        def create_module(self, spec):
            raise ImportError(f"blocked by the design test: {{spec.name}}")

        def exec_module(self, module):
            pass

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                return importlib.machinery.ModuleSpec(name, Refuse())
            return None

    sys.meta_path.insert(0, Block())
""")


def _run_blocked(code: str, blocked: tuple[str, ...]) -> subprocess.CompletedProcess:
    script = BLOCKED_IMPORT.format(blocked=blocked) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("adapter", [False, True])
def test_an_export_loads_without_the_training_stack_or_the_runners(tmp_path, tiny_tokenizer, adapter):
    """Without an adapter peft is not needed either; with an unmerged one, peft (through
    linearize.adapters) is all load_export adds."""
    from transformers import AutoTokenizer

    from linearize import adapters
    from linearize.models.exported import save_export

    model = tiny_model("llama")
    linearize.linearize_model(model, AttentionConfig(mechanism="window_linear", window_size=4, feature_dim=8))
    shipped = None
    if adapter:
        shipped = tmp_path / "adapter"
        adapters.wrap(copy.deepcopy(model), rank=2, alpha=8, dropout=0.0, targets=["q_proj"]).save_pretrained(shipped)
    save_export(model, AutoTokenizer.from_pretrained(tiny_tokenizer), tmp_path / "export", adapter_dir=shipped)
    blocked = ("linearize.train", "stages", "deepspeed") + (() if adapter else ("peft",))
    done = _run_blocked(f"""
        import torch
        from linearize.models import load_export

        model, _ = load_export({str(tmp_path / "export")!r})
        model(input_ids=torch.arange(8)[None])
    """, blocked)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_library_imports_without_the_runners():
    done = _run_blocked("""
        import pkgutil, importlib, linearize

        for info in pkgutil.walk_packages(linearize.__path__, "linearize."):
            if info.name != "linearize.__main__":
                importlib.import_module(info.name)
    """, ("stages",))
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_blocked_import_fails_in_the_subprocess():
    """The blocker itself works: otherwise the two tests above could not fail."""
    done = _run_blocked("import stages.rundir", ("stages",))
    assert done.returncode != 0 and "blocked by the design test: stages" in done.stderr
    assert torch.__version__  # the parent process is unaffected
