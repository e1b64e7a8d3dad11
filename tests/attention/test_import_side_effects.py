"""No hidden global state on the model side: importing linearize registers nothing with transformers
(registration is the explicit `register_auto_classes()`), and the export bundler lists its Triton kernel
modules itself instead of the modeling file importing them for it."""
import subprocess
import sys
import textwrap

import pytest

from linearize.models import bundle

REGISTRATION = textwrap.dedent("""
    import linearize, linearize.models
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    assert "linearize_llama" not in CONFIG_MAPPING, "registered on import"
    linearize.models.register_auto_classes()
    assert "linearize_llama" in CONFIG_MAPPING, "not registered by the call"
""")


def test_auto_classes_are_registered_by_the_call_not_the_import():
    # a fresh interpreter: this one may have registered already (load_export does)
    result = subprocess.run([sys.executable, "-c", REGISTRATION], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_bundle_lists_the_kernel_modules_explicitly():
    kernels = {bundle.flat_name(name) + ".py" for name in bundle.KERNEL_MODULES}
    # every op's Triton module is listed: an unlisted one would silently be missing from exports
    ops_with_kernels = {path.parent.name for path in bundle.PACKAGE_ROOT.glob("ops/*/triton.py")}
    assert ops_with_kernels >= {"linear_attn", "gated_linear_attn", "window_linear_attn", "gated_delta_rule"}
    assert kernels == {f"lz_ops_{op}_triton.py" for op in ops_with_kernels}
    assert kernels <= set(bundle.collect_modules())
    # a listed kernel module that no relative import reaches would not be copied out of an export
    with pytest.raises(ValueError, match="kernel modules"):
        bundle.collect_modules(kernels=(*bundle.KERNEL_MODULES, "linearize.models.teacher"))


def test_the_modeling_file_imports_no_kernel_module():
    """The kernels are reached through the ops' own lazy imports, not imported for the bundler's sake."""
    source = bundle.collect_modules()[bundle.MODELING_FILE]
    assert not [line for line in source.splitlines() if "import" in line and "triton" in line]
