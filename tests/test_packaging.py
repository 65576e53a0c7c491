"""The install mapping: every package folder is listed in pyproject, and `passes/` installs as lowbit_jax.passes."""
import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_every_package_is_installed():
  cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
  listed = set(cfg["packages"])
  found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "lowbit_jax").rglob("__init__.py")}
  found |= {"lowbit_jax.passes" + "".join("." + s for s in p.parent.relative_to(ROOT / "passes").parts)
            for p in (ROOT / "passes").rglob("__init__.py")}
  assert found == listed, f"pyproject packages out of date: missing {found - listed}, extra {listed - found}"
  assert cfg["package-dir"] == {"lowbit_jax.passes": "passes"}


def test_passes_import_as_a_subpackage():
  import lowbit_jax.passes
  assert pathlib.Path(lowbit_jax.passes.__file__).resolve().parent == ROOT / "passes"
