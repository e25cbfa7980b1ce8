"""`tome-plus` itself: usage, --version, one-line warnings and Ctrl-C in every tool."""
import subprocess
import sys

import pytest

import tome_plus
from tome_plus.tools import bench, diffrate_search, fidelity, vis
from tome_plus.tools.cli import main

from conftest import make

TINY = ["--model", "vit_tiny_patch16_224", "--device", "cpu", "--dtype", "float32", "--warmup", "0", "--runs", "1",
        "--batch-size", "1", "--img-size", "64", "--no-progress"]


def test_no_command_prints_the_usage_and_exits_2():
    proc = subprocess.run([sys.executable, "-m", "tome_plus.tools.cli"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("usage: tome-plus [-h] [--version] COMMAND ...")
    for command in ("bench", "eval", "fidelity", "vis", "diffrate-search", "finetune", "atp-train"):
        assert f"\n    {command}" in proc.stderr


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"tome_plus {tome_plus.__version__}\n"


def test_warnings_are_one_line_in_the_tools_and_python_warnings_in_the_library(capsys):
    main(["bench", *TINY, "--r", "120"])  # 17 tokens at 64 px: r=120 is clamped, with a warning
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if "warning" in line]
    assert len(warning) == 1 and warning[0].startswith("tome-plus bench: warning: budget r=120 is more than 12 layer")
    assert "UserWarning" not in err and "warnings.warn" not in err
    with pytest.warns(UserWarning, match="budget r=120") as record:  # the library still warns the Python way
        tome_plus.patch(make("vit_tiny_patch16_224", depth=4), "tome", r=120)
    assert record[0].filename == __file__


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("module,name,argv,line", [
    (bench, "run_bench", ["bench", *TINY, "--json", "{tmp}/b.json"],
     "tome-plus bench: interrupted: stopped before the timings were complete; nothing was written (--json at the "
     "end)"),
    (fidelity, "run_fidelity", ["fidelity", "--quick", "--methods", "tome"],
     "tome-plus fidelity: interrupted: stopped before the table was complete; nothing was written"),
    (vis, "visualize", ["vis", "--image", "{tmp}/in.png", "--out", "{tmp}/o.png"],
     "tome-plus vis: interrupted: stopped before {tmp}/o.png was written; nothing was written"),
    # a tool without its own report: cli.py's one line
    (diffrate_search, "main", ["diffrate-search", "--dinov2", "--data", "fashion-mnist", "--flops", "0.5", "--out",
                               "{tmp}/s.json"],
     "tome-plus diffrate-search: interrupted: stopped before it finished"),
])
def test_ctrl_c_is_one_line_and_exit_130(module, name, argv, line, tmp_path, capsys, monkeypatch):
    (tmp_path / "in.png").write_bytes(b"")
    monkeypatch.setattr(module, name, interrupt)
    with pytest.raises(SystemExit) as e:
        main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert e.value.code == 130
    assert capsys.readouterr().err == line.replace("{tmp}", str(tmp_path)) + "\n"


def test_a_corrupt_schedule_option_fails_before_the_run_naming_the_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("found before the run"))
    bad = tmp_path / "s.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit) as e:
        main(["bench", *TINY, "--method", "diffrate", "--option", f"schedule={bad}"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1
    assert err.startswith(f"tome-plus bench: error: schedule={str(bad)!r} could not be read as JSON")


class FailingImport:
    """A meta-path finder that raises `error` when `name` is imported (as a Ctrl-C or a broken
    compiled extension would, in the middle of the import)."""

    def __init__(self, name, error):
        self.name, self.error = name, error

    def find_spec(self, name, path=None, target=None):
        if name == self.name:
            raise self.error
        return None


def import_fails(monkeypatch, error, name="tome_plus.tools.bench"):
    """The next import of `name` raises `error`."""
    import tome_plus.tools
    monkeypatch.delitem(sys.modules, name)
    monkeypatch.delattr(tome_plus.tools, name.rsplit(".", 1)[1])
    monkeypatch.setattr(sys, "meta_path", [FailingImport(name, error), *sys.meta_path])


def test_ctrl_c_while_the_tools_load_is_one_line_and_exit_130(capsys, monkeypatch):
    import_fails(monkeypatch, KeyboardInterrupt())
    with pytest.raises(SystemExit) as e:
        main(["bench", "--runs", "0"])  # refused by the parser, if it were reached
    assert e.value.code == 130
    assert capsys.readouterr().err == "tome-plus bench: interrupted: stopped before it finished\n"


def matching_pair():
    from importlib.metadata import version
    release = version("torch").split("+")[0]
    minor, patch = release.split(".")[1:3]
    return f"pip install torch=={release} torchvision==0.{int(minor) + 15}.{patch}"


def test_a_torchvision_that_does_not_match_torch_is_one_line_with_the_fix(capsys, monkeypatch):
    # importing torchvision built for another torch: RuntimeError: operator torchvision::nms does not exist
    mismatch = RuntimeError("operator torchvision::nms does not exist")
    import_fails(monkeypatch, mismatch)  # while the tools load
    with pytest.raises(SystemExit) as e:
        main(["bench", "--runs", "0"])  # refused by the parser, if it were reached
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1
    assert err.startswith("tome-plus bench: error: torchvision ") and "does not match torch" in err
    assert "(operator torchvision::nms does not exist)" in err and err.endswith(f"e.g. {matching_pair()}\n")
    monkeypatch.undo()

    def run_bench(*args, **kwargs):  # while a tool runs (timm imports torchvision where it needs it)
        raise mismatch
    monkeypatch.setattr(bench, "run_bench", run_bench)
    with pytest.raises(SystemExit) as e:
        main(["bench", *TINY])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and err.endswith(f"e.g. {matching_pair()}\n")


def test_a_torchvision_that_does_not_match_torch_is_one_line_from_the_console_script(tmp_path):
    """A fake torchvision that fails as a mismatched one does; `import tome_plus` does not import it."""
    fake = tmp_path / "torchvision"
    fake.mkdir()
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    env = dict(__import__("os").environ, PYTHONPATH=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", "import sys; from tome_plus.tools.cli import main; sys.exit(main())",
                           "bench", "--r", "8"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and matching_pair() in proc.stderr


def test_ctrl_c_while_torch_loads_under_the_command_is_one_line(tmp_path):
    """The console script imports `tome_plus` (and so torch) before any tool code runs: a Ctrl-C
    then is one line and 130 too; under any other program it stays a KeyboardInterrupt."""
    hook = ("import sys\n"
            "class Stop:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'tome_plus.api':\n"
            "            raise KeyboardInterrupt\n"
            "sys.meta_path.insert(0, Stop())\n"
            "from tome_plus.tools.cli import main\n"
            "sys.exit(main())\n")
    for name in ("tome-plus", "other"):
        script = tmp_path / name
        script.write_text(hook)
        out = subprocess.run([sys.executable, str(script), "bench"], capture_output=True, text=True, timeout=120)
        if name == "tome-plus":
            assert out.returncode == 130 and out.stderr == "tome-plus: interrupted: stopped before it started\n"
        else:  # Python's own: the traceback, and death by SIGINT
            assert out.returncode != 0 and out.stderr.rstrip().endswith("KeyboardInterrupt")
