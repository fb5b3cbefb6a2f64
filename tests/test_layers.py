"""The package's layout is the data flow: a module imports only from its own layer or lower ones, never in a cycle.

Every module of `ncf` is read with `ast`, imports at module level and inside functions alike, so a lazy import
is no way round the rule. A module's layer is its subpackage's (the first digit of its notebook's number):

    0 ncf, ncf.core, ncf.options   1 ncf.data   2 ncf.model   3 ncf.train   4 ncf.serve   5 ncf.pipeline   6 ncf.emulate   7 ncf.cli

Within the data layer the two preprocessing jobs are siblings: they share `ncf.data.split` and never import
each other (the command `ncf.cli.preprocess` chooses between them)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"core": 0, "options": 0, "data": 1, "model": 2, "train": 3, "serve": 4, "pipeline": 5, "emulate": 6, "cli": 7}
SIBLINGS = {(a, b) for pandas_job, spark_job in [("ncf.data.preprocess", "ncf.data.spark"), ("ncf.data.preprocess", "ncf.data.spark_read")]
            for a, b in [(pandas_job, spark_job), (spark_job, pandas_job)]}


def modules(pkg_dir: Path) -> dict:
    "`{dotted name: file}` of every module of the package (`__init__.py` is its package; nbdev's index is left out)."
    pkg_dir, out = Path(pkg_dir), {}
    for p in sorted(pkg_dir.rglob("*.py")):
        if "__pycache__" in p.parts or p.name == "_modidx.py": continue
        parts = [pkg_dir.name, *p.relative_to(pkg_dir).with_suffix("").parts]
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def layer(name: str):
    "The layer number of a module, or None when it belongs to no layer."
    parts = name.split(".")
    return 0 if len(parts) == 1 else LAYERS.get(parts[1])


def imports(name: str, path: Path, mods: dict) -> set:
    "The package's modules that module `name` imports, anywhere in its source (a module's own packages are no edge)."
    parts, is_pkg, found = name.split("."), path.name == "__init__.py", set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import): targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = parts if is_pkg else parts[:-1]
                base = ".".join(anchor[:len(anchor) - (node.level - 1)] + ([node.module] if node.module else []))
            else: base = node.module or ""
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else: continue
        for t in targets:
            while t and t not in mods: t = t.rpartition(".")[0]   # `from m import name`: the module m
            if t and t != name and not name.startswith(t + "."): found.add(t)
    return found


def graph(pkg_dir: Path) -> dict:
    mods = modules(pkg_dir)
    return {m: imports(m, p, mods) for m, p in mods.items()}


def upward(g: dict) -> list:
    "Every import of a higher layer, and between the two preprocessing jobs, as `importer -> imported (why)`."
    bad = [f"{a} -> {b} (layer {layer(a)} imports layer {layer(b)})" for a, bs in g.items() for b in bs
           if layer(a) is not None and layer(b) is not None and layer(b) > layer(a)]
    bad += [f"{a} -> {b} (the two preprocessing jobs never import each other)" for a, bs in g.items() for b in bs if (a, b) in SIBLINGS]
    return sorted(bad)


def cycles(g: dict) -> list:
    "One closed path of edges, `a -> b -> a`, for each strongly connected group of more than one module."
    index, low, stack, on, groups, n = {}, {}, [], set(), [], [0]
    def strong(v):
        index[v] = low[v] = n[0]; n[0] += 1; stack.append(v); on.add(v)
        for w in sorted(g[v]):
            if w not in index: strong(w); low[v] = min(low[v], low[w])
            elif w in on: low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop(); on.discard(w); group.add(w)
                if w == v: break
            if len(group) > 1: groups.append(group)
    for v in sorted(g):
        if v not in index: strong(v)
    out = []
    for group in groups:
        start = min(group); paths = {start: [start]}; todo = [start]
        while todo:   # breadth first, inside the group, back to the start
            v = todo.pop(0)
            for w in sorted(g[v] & group):
                if w == start: out.append(" -> ".join(paths[v] + [start])); todo = []; break
                if w not in paths: paths[w] = paths[v] + [w]; todo.append(w)
    return sorted(out)


def test_every_module_has_a_layer():
    mods = modules(ROOT / "ncf")
    assert len(mods) > 30
    assert not [m for m in mods if layer(m) is None], "modules outside the layers " + str(sorted(LAYERS))


def test_no_import_of_a_higher_layer():
    bad = upward(graph(ROOT / "ncf"))
    assert not bad, "imports against the layering:\n  " + "\n  ".join(bad)


def test_no_import_cycle():
    bad = cycles(graph(ROOT / "ncf"))
    assert not bad, "import cycles:\n  " + "\n  ".join(bad)


def test_the_commands_are_the_top_layer():
    g = graph(ROOT / "ncf")
    assert not [f"{a} -> {b}" for a, bs in g.items() for b in bs if b.startswith("ncf.cli") and not a.startswith("ncf.cli")]


def test_a_lazy_upward_import_and_a_cycle_are_named(tmp_path):
    "The checks themselves, on a small package: an upward import inside a function, a cycle, the sibling jobs."
    pkg = tmp_path / "ncf"
    files = {"__init__.py": "", "core.py": "", "data/__init__.py": "", "train/__init__.py": "",
             "data/readers.py": "from ..core import x\ndef f():\n    from ncf.train.trainer import fit\n",
             "data/a.py": "from . import b\n", "data/b.py": "def g():\n    import ncf.data.a\n",
             "data/preprocess.py": "from .split import y\n", "data/split.py": "", "data/spark.py": "from ncf.data import preprocess\n",
             "train/trainer.py": "from ncf.data import split\nfrom .. import core\n"}
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True); (pkg / name).write_text(text)
    g = graph(pkg)
    assert upward(g) == ["ncf.data.readers -> ncf.train.trainer (layer 1 imports layer 3)",
                         "ncf.data.spark -> ncf.data.preprocess (the two preprocessing jobs never import each other)"]
    assert cycles(g) == ["ncf.data.a -> ncf.data.b -> ncf.data.a"]


def test_the_torch_free_modules_import_no_torch():
    "The data layer, the model directory's layout, the training config, the pipeline parameters and the registry load without torch."
    import subprocess, sys
    mods = ["ncf.data.readers", "ncf.data.preprocess", "ncf.model.layout", "ncf.train.config", "ncf.pipeline.params",
            "ncf.pipeline.registry", "ncf.serve.client", "ncf.options"]
    code = f"import sys\nfor m in {mods!r}: __import__(m)\nprint(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr
