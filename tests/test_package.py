"""The package as a new user meets it: `import kljax` alone, and only the declared dependencies."""

import pathlib
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_import_kljax_gives_every_module():
    import kljax

    for name in kljax.__all__:
        assert hasattr(kljax, name), name
    import jax.numpy as jnp

    value = kljax.discrete.kl(jnp.array([0.5, 0.5, 0.0]), jnp.array([0.25, 0.25, 0.5]))
    assert abs(float(value) - 0.6931471805599453) < 1e-6


def test_library_imports_only_its_declared_dependencies():
    # Every module of kljax imports with the packages outside `dependencies` made unimportable.
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(d.split(">")[0].split("=")[0] for d in declared) == ["jax", "jaxlib", "numpy", "optax", "scipy"]
    # (torch, a benchmark peer, cannot be blocked this way: SciPy looks it up in sys.modules and would
    # find None; it is not installed with the dev extra either)
    blocked = ["chex", "matplotlib", "sklearn", "numpyro", "tqdm", "equinox", "flax", "gymnax"]
    program = (
        "import sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None\n"
        "import kljax, pkgutil, importlib\n"
        "for info in pkgutil.iter_modules(kljax.__path__): importlib.import_module('kljax.' + info.name)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
