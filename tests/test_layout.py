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

# The layers, lowest first: a module imports only from its own layer's package or from lower layers.
# The bundled model's constants and its data reader sit just above the core (models and scoring
# read them); its training and model card use models and scoring, beside search.
LAYERS = [("core", ("skiptune_search", "skiptune_search.core")),
          ("bundled data", ("skiptune_search.bundled", "skiptune_search.bundled.data")),
          ("sampling", ("skiptune_search.sampling",)),
          ("models", ("skiptune_search.models",)),
          ("scoring", ("skiptune_search.scoring",)),
          ("search", ("skiptune_search.search", "skiptune_search.bundled.card", "skiptune_search.bundled.training")),
          ("bench", ("skiptune_search.bench",)),
          ("cli", ("skiptune_search.cli",)),
          ("comfyui", ("skiptune_search.comfyui",))]  # a front end of the core alone (test below)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> tuple[int, str]:
    """(rank, package) of a module: the most specific entry of LAYERS naming it or a package above it."""
    best = max(((len(prefix), rank, prefix) for rank, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
                if module == prefix or module.startswith(prefix + ".") and prefix != "skiptune_search"),
               default=None)
    assert best is not None, f"{module} is in no layer of tests/test_layout.py"
    return best[1], best[2]


def _outside_type_checking(tree: ast.AST):
    """Every node of ``tree`` but those under ``if TYPE_CHECKING:`` (which never run)."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            for node in child.orelse:
                yield node
                yield from _outside_type_checking(node)
            continue
        yield child
        yield from _outside_type_checking(child)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere (function-level imports included,
    ``if TYPE_CHECKING`` excluded); ``from . import x`` counts as x where x is a module."""
    known = {_module_name(p) for p in MODULES}
    graph = {}
    for path in MODULES:
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in _outside_type_checking(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package if node.level else ""
                full = ".".join(p for p in (base, node.module or "") if p)
                found |= {f"{full}.{a.name}" if f"{full}.{a.name}" in known else full for a in node.names}
        graph[name] = {m for m in found if m in known and m != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_circle_finder_finds_circles():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_in_a_circle():
    assert circles(import_graph()) == []


def test_every_import_runs_down_the_layers():
    """core <- bundled data <- sampling <- models <- scoring <- search (and the bundled model's
    training and card) <- bench <- cli: within a package or downward, never up or sideways."""
    graph = import_graph()
    assert len(graph) > 40 and sum(map(len, graph.values())) > 150
    wrong = []
    for module, imported in graph.items():
        rank, package = _layer(module)
        for other in imported:
            other_rank, other_package = _layer(other)
            if other_rank > rank or other_rank == rank and other_package != package:
                wrong.append(f"{module} ({LAYERS[rank][0]}) imports {other} ({LAYERS[other_rank][0]})")
    assert wrong == []


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
    """Two searches started together on one new study, each asked for 12 trials: the study ends
    with exactly 12 finished trials, one baseline, and both commands succeed. Under CMA-ES 12 trials
    pass a generation: its state, saved in the trials by one process, is read back by both."""
    command = [EXE, "search", "--model", str(tiny_model_dir), "--nfe", "3", "--n", "8", "--rungs", "8",
               "--batch", "8", "--threads", "1", "--trials", "12", "--optimizer", "cmaes"]
    runs = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    for r in runs:
        out, err = r.communicate(timeout=600)
        assert r.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name="tiny-model-heun-nfe3-linear-input",
                              storage=f"sqlite:///{tmp_path}/studies/skiptune.db")
    from skiptune_search.search.study import finished_trials

    assert finished_trials(study) == 12 and study.user_attrs["optimizer"] == "cmaes"
    assert max(t.system_attrs.get("cma:generation", 0) for t in study.trials) >= 1
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sum(bool(t.user_attrs.get("baseline")) for t in complete) == 1
    assert all(t.user_attrs.get("surplus") for t in study.trials if t.state == optuna.trial.TrialState.FAIL)


def test_every_package_folder_is_a_package():
    """A folder of modules without __init__.py imports in a checkout but is left out of a wheel."""
    folders = [d for d in PACKAGE.rglob("*") if d.is_dir() and any(d.glob("*.py"))]
    assert len(folders) >= 8
    assert [d for d in folders if not (d / "__init__.py").is_file()] == []
