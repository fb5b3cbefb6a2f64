"""The checks that keep notebooks, package and README in agreement, and the README generator.

The notebooks in `nbs/` are the source of truth; `ncf/` is what `nbdev_export` makes of them,
and `README.md` is what this module makes of `nbs/index.ipynb`. `make test` starts with
`python -m tools.repo check`, which fails with the command to run when any of these drifts:

- **export**: the notebooks are exported into a scratch copy of the repository and the result is
  compared with `ncf/`, file by file. A hand edit of a module in `ncf/`, a stray file in `ncf/`, or a
  notebook changed without `nbdev_export` all show up here. The scratch copy matters: exporting in
  place would silently overwrite the very hand edit we want to report.
- **clean**: `nbdev_clean` runs on a scratch copy of `nbs/`; any notebook it would change fails.
- **readme**: `README.md` is regenerated in memory and compared.
- **valid**: every notebook passes nbformat's schema (the docs site and papermill refuse one that does not).
- **cells**: no exported cell of a reference notebook (`nbs/api/`) is longer than 40 lines, and every
  public function and class it exports is used by an example cell of the same notebook.

nbdev's own `nbdev_readme` renders through Quarto, which cannot be installed everywhere we run;
nbconvert's markdown exporter with one small preprocessor does the same job offline.

Repository tooling, not part of the `ncf` package (not installed, not hashed into `code_version`,
not staged into containers): `python -m tools.repo check|readme` from the repository root.
"""
from __future__ import annotations
import filecmp, re, shutil, subprocess, sys, tempfile
from pathlib import Path

def repo_root(start=None) -> Path:
    "The directory holding `settings.ini`, searching upwards from `start` (default: the cwd)."
    p = Path(start or Path.cwd()).resolve()
    for d in (p, *p.parents):
        if (d/"settings.ini").exists(): return d
    raise FileNotFoundError(f"no settings.ini in {p} or its parents: run this inside the ncf repository")

def _nbdev_bin(name): return str(Path(sys.executable).parent/name)

def _scratch_copy(root:Path, dest:Path, names=("settings.ini", "setup.py", "nbs")):
    for n in names:
        src = root/n
        if src.is_dir(): shutil.copytree(src, dest/n, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
        elif src.exists(): shutil.copy2(src, dest/n)

def _tree_diff(a:Path, b:Path):
    "Relative paths that differ between two trees (missing on either side, or different bytes)."
    def files(d): return {p.relative_to(d) for p in d.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    fa, fb = files(a), files(b)
    changed = {p for p in fa & fb if not filecmp.cmp(a/p, b/p, shallow=False)}
    return sorted(str(p) for p in (fa ^ fb) | changed)

def _drift(root, tool:str, folder:str) -> list[str]:
    "Files of `folder` that running nbdev's `tool` on a scratch copy of the repository would change."
    root = repo_root(root)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d); _scratch_copy(root, d)
        subprocess.run([_nbdev_bin(tool)], cwd=d, check=True, capture_output=True)
        return _tree_diff(root/folder, d/folder)

def export_drift(root=None) -> list[str]:
    "Files of `ncf/` that differ from a fresh `nbdev_export` of the notebooks."
    return _drift(root, "nbdev_export", "ncf")

def clean_drift(root=None) -> list[str]:
    "Notebooks that `nbdev_clean` would change."
    return [f"nbs/{p}" for p in _drift(root, "nbdev_clean", "nbs")]


# ## README from `index.ipynb`
#
# `doc_cells` follows nbdev's conventions for what a reader sees: a cell whose directives say
# `hide` or `include: false` is dropped, and so is the `default_exp` cell; `echo: false` leaves
# only the output and `output: false` only the source; every `#|` directive line is stripped from
# what remains. The README generator here and the offline docs site (`tools.docs`) both use it, so
# the README and the site's index page show the same cells.

_DIRECTIVE = re.compile(r"^\s*#\|\s*(.*)$")

def directives(src:str) -> set[str]:
    "A cell's `#|` directives, spaces removed: `{'hide', 'eval:false', ...}`."
    return {m.group(1).strip().replace(" ", "") for l in src.splitlines() if (m := _DIRECTIVE.match(l))}

def strip_directives(src:str) -> str:
    "The cell's source without its `#|` directive lines."
    return "\n".join(l for l in src.splitlines() if not _DIRECTIVE.match(l)).strip("\n")

def doc_cells(cells:list) -> list:
    "The cells a reader sees, as nbdev renders them: hidden cells dropped, directives applied and stripped (edits code cells in place)."
    out = []
    for c in cells:
        d = directives(c.source) if c.cell_type == "code" else set()
        if {"hide", "include:false"} & d or re.match(r"^\s*#\|\s*default_exp", c.source): continue
        if c.cell_type == "code":
            if "output:false" in d: c.outputs = []
            if "echo:false" in d: c.source = ""
            c.source = strip_directives(c.source)
            if not c.source and not c.get("outputs"): continue
        out.append(c)
    return out

def readme_text(root=None) -> str:
    "Markdown of `nbs/index.ipynb` the way nbdev would render it, without Quarto."
    import nbformat
    from nbconvert import MarkdownExporter
    from nbconvert.preprocessors import Preprocessor

    class NbdevDirectives(Preprocessor):
        def preprocess(self, nb, resources):
            nb.cells = doc_cells(nb.cells)
            return nb, resources

    root = repo_root(root)
    nb = nbformat.read(root/"nbs"/"index.ipynb", as_version=4)
    exporter = MarkdownExporter(); exporter.register_preprocessor(NbdevDirectives(), enabled=True)
    body, _ = exporter.from_notebook_node(nb)
    header = "<!-- Generated from nbs/index.ipynb by `make readme`: edit the notebook, not this file. -->\n\n"
    return header + re.sub(r"\n{3,}", "\n\n", body).strip() + "\n"

def readme_drift(root=None) -> list[str]:
    "`['README.md']` when it differs from what `nbs/index.ipynb` renders to, else `[]`."
    root = repo_root(root); readme = root/"README.md"
    return [] if readme.exists() and readme.read_text() == readme_text(root) else ["README.md"]

def write_readme(root=None) -> Path:
    "Regenerate `README.md` from `nbs/index.ipynb`."
    root = repo_root(root); (root/"README.md").write_text(readme_text(root))
    return root/"README.md"


# ## Cells
#
# What can be counted about a reference notebook (`nbs/api/`) is checked: no exported cell longer
# than `MAX_CELL_LINES` (directives excluded), and every public function or class it exports used
# by at least one example cell (a code cell that is not exported) of the same notebook, so that the
# docs site shows each one at work.

MAX_CELL_LINES = 40

def _exported(src:str) -> bool: return bool({"export", "exports"} & directives(src))

def public_definitions(src:str) -> list[str]:
    "Names of the public functions and classes a cell defines at top level."
    import ast
    try: tree = ast.parse(strip_directives(src))
    except SyntaxError: return []
    return [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not n.name.startswith("_")]

def notebook_cell_problems(path:Path, rel:str) -> list[str]:
    "One line per exported cell that is too long and per exported public name no example cell uses."
    import json
    cells = [c for c in json.loads(Path(path).read_text())["cells"] if c["cell_type"] == "code"]
    srcs = ["".join(c["source"]) for c in cells]
    problems, examples = [], "\n".join(s for s in srcs if not _exported(s))
    for i, s in enumerate(srcs):
        if not _exported(s): continue
        if (n := len(strip_directives(s).splitlines())) > MAX_CELL_LINES:
            problems.append(f"{rel}: code cell {i + 1} is {n} lines (at most {MAX_CELL_LINES}): split it")
        problems += [f"{rel}: {name} is exported but no example cell uses it" for name in public_definitions(s)
                     if not re.search(rf"\b{re.escape(name)}\b", examples)]
    return problems

def invalid_notebooks(root=None) -> list[str]:
    "Every notebook of `nbs/` and `pipelines/` that nbformat's schema refuses (a cell without an id, say), with the reason."
    import nbformat
    root = repo_root(root); bad = []
    for p in sorted([*(root/"nbs").rglob("*.ipynb"), *(root/"pipelines").glob("*.ipynb")]):
        if ".ipynb_checkpoints" in p.parts: continue
        try: nbformat.validate(nbformat.read(p, as_version=4))
        except Exception as e: bad.append(f"{p.relative_to(root).as_posix()} ({str(e).splitlines()[0]})")
    return bad

def cell_problems(root=None, names=None) -> list[str]:
    "`notebook_cell_problems` of every reference notebook (or of the notebooks whose stem is in `names`)."
    root = repo_root(root)
    return [q for p in sorted((root/"nbs"/"api").glob("*.ipynb")) if not names or p.stem in names
            for q in notebook_cell_problems(p, p.relative_to(root).as_posix())]


# ## The check

CHECKS = {
    "export": (export_drift, "ncf/ does not match the notebooks. Edit the notebook (never ncf/ by hand), then run `make export` (nbdev_export) and commit nbs/ and ncf/ together."),
    "clean":  (clean_drift,  "notebooks are not clean. Run `make clean-nbs` (nbdev_clean) and commit them."),
    "readme": (readme_drift, "README.md is out of date. Run `make readme` (python -m tools.repo readme) and commit it."),
    "valid":  (invalid_notebooks, "notebooks do not match the notebook format (nbformat.validate): open and save them in Jupyter, or give every cell an id."),
    "cells":  (cell_problems, f"reference notebooks need short exported cells (at most {MAX_CELL_LINES} lines) and an example of every exported function and class: `python -m tools.repo cells` lists them."),
}

def check(root=None) -> list[str]:
    "Run every repository check; return one failure message per failed check (empty when all pass)."
    failures = []
    for name, (fn, fix) in CHECKS.items():
        if drift := fn(root): failures.append(f"[{name}] {fix}\n    differs: " + ", ".join(drift[:10]) + (" ..." if len(drift) > 10 else ""))
    return failures

def main(argv=None):
    "`python -m tools.repo check|readme|cells`"
    import argparse
    p = argparse.ArgumentParser(prog="python -m tools.repo", description=__doc__)
    p.add_argument("command", choices=["check", "readme", "cells"])
    p.add_argument("notebooks", nargs="*", help="cells: only these reference notebooks (names without .ipynb)")
    a = p.parse_args(argv)
    if a.command == "readme": print(f"wrote {write_readme()}"); return 0
    if a.command == "cells":
        problems = cell_problems(names=a.notebooks)
        print("\n".join(problems) or "every exported cell is short and every exported function and class has an example")
        return 1 if problems else 0
    if failures := check():
        print("Repository check FAILED:\n" + "\n".join(failures), file=sys.stderr); return 1
    print("Repository check passed: ncf/ matches the notebooks, notebooks are clean, README.md is current, every exported cell is short and shown at work.")
    return 0

if __name__ == "__main__": sys.exit(main())
