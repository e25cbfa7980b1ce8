"""The package's layers import downwards only (README, "Layout"): the model-agnostic core, methods,
backends and api never import the training or tools layers; no tool imports another tool, so each
command's file holds its command and draws on the tools' shared modules."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "tome_plus"
TOOLS = ROOT / "tools"
# the tools' commands (`tome-plus <command>`, `python -m tome_plus.tools.<tool>`) and the parts of
# one command (`bench --hf`, `bench --kernels`), which only that command imports
COMMANDS = {"bench", "eval", "fidelity", "vis", "finetune", "atp_train", "diffrate_search", "sweep"}
PARTS = {"bench_hf": "bench", "kernel_bench": "bench", "bench_kv": "bench"}
# a command made of other commands' measurements (sweep: eval's or fidelity's accuracy, bench's
# speed at every point) may call theirs; no other command imports a command
COMPOSES = {"sweep": {"bench", "bench_hf", "eval", "fidelity"}}
# what the tools share: CLI plumbing, data, models, timing, reports, FLOPs, model sources
SHARED = {"common", "data", "models", "timing", "report", "flops", "hf_shapes", "focus_dinov2"}
ENTRY = {"cli", "__init__"}  # the dispatcher imports every command


def imported(path: Path):
    """Dotted names of the tome_plus modules `path` imports (anywhere in the file), resolved."""
    package = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)  # `from . import bench`
    return {n for n in names if n == "tome_plus" or n.startswith("tome_plus.")}


def test_every_tools_module_is_classified():
    found = {p.stem for p in TOOLS.glob("*.py")}
    assert found == COMMANDS | set(PARTS) | SHARED | ENTRY


@pytest.mark.parametrize("path", sorted(TOOLS.glob("*.py")), ids=lambda p: p.name)
def test_no_tool_imports_another_tool(path):
    if path.stem in ENTRY:
        return
    names = imported(path)
    tools = {n.split(".")[2] for n in names if n.startswith("tome_plus.tools.") and n.count(".") >= 2}
    allowed = set(SHARED) | {p for p, owner in PARTS.items() if owner == path.stem} | COMPOSES.get(path.stem, set())
    if path.stem in SHARED:
        allowed = set(SHARED)  # a shared module draws on the others only
    assert tools <= allowed | {path.stem}, f"{path.name} imports {sorted(tools - allowed - {path.stem})}"


LOWER = ["api.py", "state.py", "schedule.py", "merging.py", "reduce.py", "prop_attn.py", "precision.py",
         "warn.py", "vis.py", "registry.py", "methods", "backends", "heads"]


def top_level(path: Path):
    """Dotted names of the tome_plus modules imported at the top of `path` (not inside a function)."""
    package = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts[:-1])
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            out.add(".".join(base + ([node.module] if node.module else [])))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


@pytest.mark.parametrize("where", LOWER)
def test_core_methods_and_backends_import_no_tools_or_training(where):
    upper = ("tome_plus.tools", "tome_plus.training")
    paths = [ROOT / where] if where.endswith(".py") else sorted((ROOT / where).rglob("*.py"))
    for path in [p for p in paths if p.exists()]:
        names = imported(path)
        if path == ROOT / "heads" / "__init__.py":
            # `heads.save` writes through the training layer's atomic writer, imported inside it only
            assert not any(n.startswith(upper) for n in top_level(path)), path
            names = {n for n in names if not n.startswith("tome_plus.training")}
        bad = sorted(n for n in names if n.startswith(upper))
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_training_imports_no_tools():
    for path in sorted((ROOT / "training").rglob("*.py")):
        bad = sorted(n for n in imported(path) if n.startswith("tome_plus.tools"))
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


@pytest.mark.parametrize("tool", sorted(COMMANDS))
def test_every_command_keeps_its_module_path(tool):
    import importlib

    module = importlib.import_module(f"tome_plus.tools.{tool}")
    assert callable(module.main) and callable(module.build_parser)


def test_short_paths_name_the_training_modules_public_functions():
    """`tome_plus.atp` and `tome_plus.diffrate_search` are modules of their own that import the
    public names of `training.atp` / `training.diffrate`: the same objects, under the short path."""
    import tome_plus
    from tome_plus import atp, diffrate_search, training

    assert tome_plus.atp is atp and atp is not training.atp
    assert tome_plus.diffrate_search is diffrate_search and diffrate_search is not training.diffrate
    for short, home in ((atp, training.atp), (diffrate_search, training.diffrate)):
        for name in short.__all__:
            assert getattr(short, name) is getattr(home, name), f"{short.__name__}.{name}"
    for module, names in ((atp, ("train", "save", "load", "modules")),
                          (diffrate_search, ("search", "save_schedule", "read_checkpoint", "DiffRateRates",
                                             "SearchInterrupted", "full_gmacs", "save", "load")),
                          (training, ("cycle", "distributed_world", "broadcast_from_first", "average_gradients")),
                          (tome_plus.heads, ("save", "load", "module", "name_of"))):
        for name in names:
            assert callable(getattr(module, name)), f"{module.__name__}.{name}"


def assigns_sys_modules(tree: ast.AST) -> bool:
    """Whether `tree` writes into `sys.modules`: `sys.modules[...] = ...` (or `del`, `+=`), or a
    call of its `update`, `setdefault`, `__setitem__` or `pop`."""
    def is_sys_modules(node: ast.AST) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "modules"
                and isinstance(node.value, ast.Name) and node.value.id == "sys")

    for node in ast.walk(tree):
        targets = (node.targets if isinstance(node, (ast.Assign, ast.Delete))
                   else [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
        if any(isinstance(t, ast.Subscript) and is_sys_modules(t.value) for t in targets):
            return True
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and is_sys_modules(node.func.value)
                and node.func.attr in ("update", "setdefault", "__setitem__", "pop")):
            return True
    return False


def test_assigns_sys_modules_finds_each_form():
    for code in ("sys.modules[__name__] = m", "sys.modules['a'] += m", "del sys.modules['a']",
                 "sys.modules.update(a=m)", "sys.modules.setdefault('a', m)"):
        assert assigns_sys_modules(ast.parse(code)), code
    assert not assigns_sys_modules(ast.parse("x = sys.modules['a']; ok = 'a' in sys.modules"))


# every file the distribution installs: the package and its kernels (installed as tome_plus.triton_kernels)
INSTALLED = sorted(ROOT.rglob("*.py")) + sorted((ROOT.parent / "triton_kernels").rglob("*.py"))


@pytest.mark.parametrize("path", INSTALLED, ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_no_module_replaces_itself_in_sys_modules(path):
    """Every module is what its file says: none puts another object in `sys.modules` (a short
    path is a plain module that imports its home's public names)."""
    assert not assigns_sys_modules(ast.parse(path.read_text())), f"{path.relative_to(ROOT.parent)} writes sys.modules"


def test_ci_runs_the_readme_test_command():
    """README, "Run the tests": CI (`.ci/run`) runs each command of that block as it stands."""
    top = ROOT.parent
    readme = (top / "README.md").read_text()
    block = readme.split("## Run the tests", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]
    ci = [line.strip() for line in (top / ".ci" / "run").read_text().splitlines()]
    assert commands and all(command in ci for command in commands), commands


def test_import_loads_no_model_library():
    """`import tome_plus` loads neither timm, transformers nor PIL: a user of one family pays for
    no other (they load when a model of theirs is patched, or a tool that needs them runs)."""
    code = ("import sys, tome_plus; tome_plus.methods(); "
            "print(sorted(m for m in ('timm', 'transformers', 'PIL') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:] + out.stdout
