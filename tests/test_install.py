"""The checkout never shadows an installed distribution, and imports work from its root.

Python puts the checkout root first on ``sys.path`` for ``python -c``, ``python -m`` and pytest
(``tests/`` is a package), so a top-level folder with an ``__init__.py`` (or a top-level ``.py``
file) hides any installed top-level module of the same name. transformers imports the ``kernels``
distribution; the card's top-level ``kernels/`` folder once hid it and every DeepSeek import failed.
"""
import importlib.metadata
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _importable_top_level_names() -> dict[str, pathlib.Path]:
    """Names the checkout root makes importable as regular packages or modules (namespace folders yield)."""
    names = {}
    for entry in ROOT.iterdir():
        if entry.is_dir() and (entry / "__init__.py").exists():
            names[entry.name] = entry
        elif entry.is_file() and entry.suffix == ".py":
            names[entry.stem] = entry
    return names


def test_checkout_shadows_no_installed_distribution():
    installed = importlib.metadata.packages_distributions()
    clashes = {name: (str(path), installed[name]) for name, path in _importable_top_level_names().items()
               if name in installed and set(installed[name]) != {"moe_ep"}}
    assert not clashes, f"these checkout entries shadow installed distributions' top-level modules: {clashes}"


def test_kernels_folder_is_not_a_top_level_package():
    assert (ROOT / "kernels").is_dir() and not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "moe_ep" / "kernels").resolve() == (ROOT / "kernels").resolve()


def _run_from_root(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=100)


def test_transformers_deepseek_imports_from_the_checkout_root():
    result = _run_from_root("import transformers.models.deepseek_v2.modeling_deepseek_v2\n"
                            "import transformers.models.deepseek_v3.modeling_deepseek_v3\n"
                            "import moe_ep.kernels.grouped_mm as g\n"
                            "print(g.__file__)")
    assert result.returncode == 0, result.stderr[-3000:]
    assert pathlib.Path(result.stdout.strip()).resolve().parent == (ROOT / "kernels").resolve()


def test_installed_kernels_distribution_wins_over_the_folder():
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the `kernels` distribution is not installed here")
    result = _run_from_root("import kernels, pathlib; print(pathlib.Path(kernels.__file__).resolve())")
    assert result.returncode == 0, result.stderr[-3000:]
    assert pathlib.Path(result.stdout.strip()).parent != (ROOT / "kernels").resolve(), result.stdout
