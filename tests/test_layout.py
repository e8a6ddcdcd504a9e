"""The architecture as rules: imports run one way, --help loads no torch, trials are exact."""

import ast
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

PACKAGE = Path(__file__).parent.parent / "skiptune_search"
EXE = str(Path(sys.executable).parent / "skiptune-search")


def _imports(path: Path, module_level: bool = False) -> list[str]:
    """Absolute names of what a module imports (relative imports resolved against its package);
    with ``module_level``, only those run when it is imported (not inside a function)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = []
    tree = ast.parse(path.read_text())
    nodes = ast.walk(tree)
    if module_level:
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        inside = {id(m) for f in functions for m in ast.walk(f)}
        nodes = (n for n in ast.walk(tree) if id(n) not in inside)
    for node in nodes:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            names.append(".".join(p for p in (base, node.module or "") if p))
    return names


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_the_core_imports_nothing_else_of_the_package_and_no_optuna_or_cli():
    for path in (PACKAGE / "core").glob("*.py"):
        for name in _imports(path):
            assert not name.startswith("skiptune_search.") or name.startswith("skiptune_search.core"), (path, name)
            assert name.split(".")[0] not in ("optuna", "torch_fidelity", "click"), (path, name)
        # diffusers only inside a function (FreeU's filter is diffusers' own): importing the core loads none
        assert "diffusers" not in {n.split(".")[0] for n in _imports(path, module_level=True)}, path


def test_the_comfyui_node_needs_only_the_core():
    """ComfyUI's environment has torch, not the search's packages: the node imports the core alone."""
    for path in (PACKAGE / "comfyui").glob("*.py"):
        for name in _imports(path):
            if name.startswith("skiptune_search."):
                assert name.startswith(("skiptune_search.core", "skiptune_search.comfyui")), (path, name)
            assert name.split(".")[0] not in ("optuna", "torch_fidelity", "click", "diffusers", "jsonschema"), (path, name)
        assert not {n.split(".")[0] for n in _imports(path, module_level=True)} & {"torch", "comfy"}, path


def test_only_the_search_package_imports_optuna_and_only_the_cli_click():
    assert len(MODULES) > 30
    for path in MODULES:
        package = path.relative_to(PACKAGE).parts[0]
        for name in _imports(path):
            if name.split(".")[0] in ("optuna", "optuna_dashboard"):
                assert package == "search", (path, name)
            if name.split(".")[0] == "click":
                assert package == "cli", (path, name)


def test_help_of_every_command_loads_no_torch():
    code = ("import sys\nfrom skiptune_search.cli import main\n"
            "for command in sorted(main.commands):\n"
            "    try:\n        main([command, '--help'])\n    except SystemExit:\n        pass\n"
            "print('LOADED', [m for m in ('torch', 'optuna', 'torch_fidelity', 'diffusers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "Usage: " in out and out.strip().splitlines()[-1] == "LOADED []"
    assert out.count("Usage: ") == 13


def test_apply_needs_only_the_core():
    code = ("import sys\nfrom skiptune_search import apply, RhoSchedule, SkiptuneError\n"
            "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('skiptune_search.')}),"
            " [m for m in ('optuna', 'torch_fidelity', 'click', 'diffusers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['core'] []"


def test_library_errors_share_one_base_and_name_no_flags():
    """Library messages say what is wrong in the library's words; the CLI adds the flag (and the
    ComfyUI node, a front end too, may name the search's flag to use)."""
    from skiptune_search import SkiptuneError
    from skiptune_search.core import errors

    kinds = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, Exception)]
    assert len(kinds) >= 10 and all(issubclass(k, SkiptuneError) for k in kinds)
    for path in MODULES:
        if path.relative_to(PACKAGE).parts[0] in ("cli", "comfyui"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                text = ast.unparse(node.exc)
                assert " --" not in text and "'--" not in text and '"--' not in text, (path, text)


def test_concurrent_searches_stop_at_exactly_the_trial_count(tiny_model_dir, tmp_path):
    """Two searches started together on one new study, each asked for 5 trials: the study ends
    with exactly 5 finished trials, one baseline, and both commands succeed."""
    command = [EXE, "search", "--model", str(tiny_model_dir), "--nfe", "3", "--n", "8", "--rungs", "8",
               "--batch", "8", "--threads", "1", "--trials", "5"]
    runs = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    for r in runs:
        out, err = r.communicate(timeout=600)
        assert r.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name="tiny-model-heun-nfe3-linear-input",
                              storage=f"sqlite:///{tmp_path}/studies/skiptune.db")
    from skiptune_search.search.study import finished_trials

    assert finished_trials(study) == 5
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sum(bool(t.user_attrs.get("baseline")) for t in complete) == 1
    assert all(t.user_attrs.get("surplus") for t in study.trials if t.state == optuna.trial.TrialState.FAIL)


def test_every_package_folder_is_a_package():
    """A folder of modules without __init__.py imports in a checkout but is left out of a wheel."""
    folders = [d for d in PACKAGE.rglob("*") if d.is_dir() and any(d.glob("*.py"))]
    assert len(folders) >= 8
    assert [d for d in folders if not (d / "__init__.py").is_file()] == []
