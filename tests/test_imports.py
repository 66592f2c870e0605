"""Module structure: imports point one way (no cycles), and every command line users type still runs."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _imports(path: Path, package: str, known: set[str]) -> set[str]:
    """The modules of `known` that `path` imports anywhere (function bodies and `if` blocks included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's own package
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from pkg import mod` imports the submodule mod; `from mod import name` the module mod
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, done = [], set()

    def visit(node, path):
        if node in path:
            cycles.append(path[path.index(node):] + [node])
            return
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, path + [node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])
    return cycles


def _graph(folder: Path, prefix: str) -> dict[str, set[str]]:
    """The import graph of a package (`prefix`: its name) or, prefix "", of a folder of scripts (not below it)."""
    files = {}
    for path in sorted(folder.rglob("*.py") if prefix else folder.glob("*.py")):
        parts = list(path.relative_to(folder).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join([prefix, *parts] if prefix else parts)] = path
    known = set(files)
    return {name: _imports(path, name if path.name == "__init__.py" else name.rpartition(".")[0], known) - {name}
            for name, path in files.items()}


def test_the_package_and_the_benchmarks_import_without_cycles():
    for folder, prefix in [(REPO / "fctrain", "fctrain"), (REPO / "kernels", "kernels"), (REPO / "benchmarks", "")]:
        graph = _graph(folder, prefix)
        assert graph and not _cycles(graph), f"{folder.name}: import cycles {_cycles(graph)}"


def _python_m(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_cleaning_cli_and_its_old_name_give_the_same_result(tmp_path):
    """`python -m fctrain.cleaning` is the data cleaning command line; `python -m fctrain.data`, its old name,
    stays an alias for one release."""
    outputs = []
    for module in ("fctrain.cleaning", "fctrain.data"):
        out = tmp_path / module
        proc = _python_m("-m", module, "validate", "--input", "bfcl:simple_python", "--output", str(out / "clean.jsonl"),
                         "--report", str(out / "report.json"))
        assert proc.returncode == 0, proc.stderr[-2000:]
        outputs.append(((out / "clean.jsonl").read_text(), json.loads((out / "report.json").read_text())))
    assert outputs[0] == outputs[1] and outputs[0][0].count("\n") > 300
    proc = _python_m("-m", "fctrain.data", "--help")
    assert proc.returncode == 0 and "validate" in proc.stdout


def test_python_m_fctrain_eval_runs_each_file_once():
    """The evaluation CLI is fctrain/eval/__main__.py: `python -m fctrain.eval` executes the library once (as
    eval.py with a __main__ block, it ran twice: as __main__ and again as fctrain.eval)."""
    script = """if True:
        import collections, json, runpy, sys
        runs = collections.Counter()
        sys.addaudithook(lambda event, args: event == "exec" and getattr(args[0], "co_name", "") == "<module>"
                         and runs.update([args[0].co_filename]))
        sys.argv = ["fctrain.eval", "--help"]
        try:
            runpy.run_module("fctrain.eval", run_name="__main__", alter_sys=True)  # what `python -m` does
        except SystemExit:
            pass
        print(json.dumps({k: v for k, v in runs.items() if "fctrain" in k}))
    """
    proc = _python_m("-c", script)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = json.loads(proc.stdout.strip().splitlines()[-1])
    package = str(REPO / "fctrain" / "eval")
    assert runs[os.path.join(package, "__init__.py")] == 1 and runs[os.path.join(package, "__main__.py")] == 1, runs
    assert all(count == 1 for count in runs.values()), runs
