"""The package's layers import downwards only (docs/design.md, "Layers, and what may import what"):
every module imports only the layers its row names (`LAYERS`, a DAG); no tool imports another tool,
so each command's file holds its command and draws on the tools' shared modules; every module says
what it serves in fewer than 500 lines."""
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
PARTS = {"kernel_bench": "bench", "bench_kv": "bench"}
# what the tools share: CLI plumbing, data, models, timing, reports, FLOPs, model sources, and the
# measurements (`measure`, `bench_hf`) that the commands report and the sweep makes at every point
SHARED = {"common", "data", "models", "timing", "report", "flops", "hf_shapes", "hf_prompts", "focus_dinov2", "measure",
          "bench_hf"}
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
    allowed = set(SHARED) | {p for p, owner in PARTS.items() if owner == path.stem}
    if path.stem in SHARED:
        allowed = set(SHARED)  # a shared module draws on the others only
    assert tools <= allowed | {path.stem}, f"{path.name} imports {sorted(tools - allowed - {path.stem})}"


# The layers of docs/design.md ("Layers, and what may import what"), top to bottom: each names its
# modules (paths under tome_plus/: a file, or a folder and all in it; the longest path that holds a
# module places it) and the layers it may import. Imports point down: the table is a DAG (checked
# below), and every module's tome_plus imports, at the top or inside a function (not those under
# `if TYPE_CHECKING:`), stay in its own layer or a layer its row names.
CORE = ["state.py", "schedule.py", "merging.py", "reduce.py", "prop_attn.py", "precision.py", "warn.py", "registry.py"]
LAYERS = {
    "tools": (["tools"], {"integrations", "package", "training", "api", "heads", "backends", "vlm", "kv", "llm",
                          "encoders", "record", "methods", "core", "triton_kernels"}),
    "integrations": (["integrations"], {"package", "vlm", "encoders", "llm", "record", "methods", "core"}),
    "package": (["__init__.py", "atp.py", "diffrate_search.py", "vis.py"], {"training", "api", "heads"}),
    "training": (["training"], {"api", "encoders", "llm", "record", "methods", "core"}),
    "api": (["api.py"], {"backends", "heads", "kv", "record", "methods", "core"}),
    "heads": (["heads"], {"record", "methods", "core"}),
    "backends": (["backends"], {"vlm", "encoders", "kv", "llm", "record", "methods", "core"}),
    "vlm": (["vlm"], {"encoders", "kv", "llm", "record", "methods", "core"}),
    "kv": (["kv"], {"llm", "record", "core"}),
    "llm": (["llm"], {"record", "methods", "core"}),
    "encoders": (["backends/timm_vit.py", "backends/hf_clip.py"], {"record", "methods", "core"}),
    "record": (["backends/base.py", "backends/contract.py"], {"methods", "core"}),
    "methods": (["methods"], {"core", "triton_kernels"}),
    "core": (CORE, {"triton_kernels"}),
    "triton_kernels": ([], set()),  # tome_plus.triton_kernels (the repository's triton_kernels/)
}
# what a layer imports from above it, inside one function only (`heads.save` writes through the
# training layer's atomic writer)
INSIDE_A_FUNCTION = {("heads/__init__.py", "training")}


def layer_of(path: Path) -> str:
    """The layer of an installed module (its file)."""
    if ROOT not in path.parents:
        return "triton_kernels"
    rel = path.relative_to(ROOT).as_posix()
    found = [(len(m), layer) for layer, (members, _) in LAYERS.items() for m in members
             if rel == m or rel.startswith(m + "/")]
    assert found, f"{rel} is in no layer of LAYERS"
    return max(found)[1]


def module_file(name: str):
    """The file of the tome_plus module `name` (None: not a module, e.g. a function's name)."""
    parts = name.split(".")[1:]
    if parts[:1] == ["triton_kernels"]:
        base = (ROOT.parent / "triton_kernels").joinpath(*parts[1:])
    else:
        base = ROOT.joinpath(*parts)
    if not parts:
        return ROOT / "__init__.py"
    return next((f for f in (base.with_suffix(".py"), base / "__init__.py") if f.exists()), None)


def layered_imports(path: Path):
    """(module file, inside a function) of every tome_plus module `path` imports, but those under
    `if TYPE_CHECKING:`; `from package import name` counts as the module `package.name` where that is one."""
    package = ".".join(path.relative_to(ROOT.parent).parts[:-1])  # what `from . import` names
    if ROOT not in path.parents:  # a kernel file, installed as tome_plus.triton_kernels
        package = "tome_plus." + package
    found = []

    def visit(node: ast.AST, inside: bool) -> None:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            return
        inside = inside or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        if isinstance(node, ast.Import):
            found.extend((a.name, inside) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            for a in node.names:
                found.append((f"{module}.{a.name}" if module_file(f"{module}.{a.name}") else module, inside))
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(ast.parse(path.read_text()), False)
    return [(module_file(n), inside) for n, inside in found if n == "tome_plus" or n.startswith("tome_plus.")]


def test_the_layers_form_a_dag():
    """Every layer a row names is a layer, and following the rows never comes back (imports point down)."""
    for layer in LAYERS:
        seen, todo = {layer}, list(LAYERS[layer][1])
        while todo:
            below = todo.pop()
            assert below in LAYERS, f"{layer} names {below!r}, which is no layer"
            assert below != layer, f"a cycle: {layer} comes back to itself through {sorted(seen - {layer})}"
            if below not in seen:
                seen.add(below)
                todo.extend(LAYERS[below][1])


# every file the distribution installs: the package and its kernels (installed as tome_plus.triton_kernels)
INSTALLED = sorted(ROOT.rglob("*.py")) + sorted((ROOT.parent / "triton_kernels").rglob("*.py"))


@pytest.mark.parametrize("path", INSTALLED, ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_every_module_imports_only_the_layers_its_row_names(path):
    layer = layer_of(path)
    rel = path.relative_to(ROOT).as_posix() if ROOT in path.parents else path.name
    for target, inside in layered_imports(path):
        assert target is not None
        other = layer_of(target)
        if other == layer or other in LAYERS[layer][1]:
            continue
        assert inside and (rel, other) in INSIDE_A_FUNCTION, \
            f"{rel} ({layer}) imports {target.relative_to(ROOT.parent)} ({other}); {layer} may import " \
            f"{sorted(LAYERS[layer][1])}"


@pytest.mark.parametrize("path", INSTALLED, ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_every_module_says_what_it_serves_in_under_500_lines(path):
    text = path.read_text()
    assert ast.get_docstring(ast.parse(text)), f"{path.relative_to(ROOT.parent)} has no module docstring"
    assert text.count("\n") < 500, f"{path.relative_to(ROOT.parent)} has {text.count(chr(10))} lines"


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
    from tome_plus.training import diffrate_forward
    for short, homes in ((atp, [training.atp]), (diffrate_search, [training.diffrate, diffrate_forward])):
        for name in short.__all__:
            home = next((m for m in homes if name in vars(m)), None)
            assert home is not None and getattr(short, name) is getattr(home, name), f"{short.__name__}.{name}"
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
