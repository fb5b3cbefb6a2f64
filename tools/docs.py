"""The documentation site, built offline: every notebook executed on small data and rendered to HTML with its plots, one page each, with navigation.

nbdev's own site is rendered by Quarto, which cannot be installed everywhere we build (GitLab's
`pages` job installs it and builds that site; see `.gitlab-ci.yml`). `make docs` builds a site
without it, from tools the project already depends on:

1. **execute** every notebook of `nbs/` with nbclient, in a fresh kernel with `NCF_SMALL=1`, two
   at a time. The notebooks are kept clean in git (no outputs), so the outputs a reader sees,
   plots included, are made here, by the same code the tests run. The cells that `nbdev_test`
   skips (`#| eval: false`, and the test flags of `settings.ini`) are skipped here too, with
   nbclient's own `skip-execution` tag;
2. **filter** the cells the way nbdev renders them, with `tools.repo.doc_cells`, the function that
   also makes the README: hidden cells dropped, `#|` lines stripped, `echo`/`output` honoured;
3. **render** each notebook with nbconvert's `HTMLExporter` (the JupyterLab template: plots are
   embedded as base64 PNGs, so a page is one self-contained file), plus a navigation sidebar,
   previous/next links, and, on the index page, a table of every page;
4. **link**: links to notebooks become links to their pages; links to other files of the
   repository go to the repository's web page (`git_url` in `settings.ini`), since the site does
   not host them. The build fails if any local link of the site leads nowhere.

The site is written to a scratch folder and moved into place at the end, so a failed build leaves
the previous site as it was. Nothing is fetched from the network: the only external resources
are MathJax, requested by pages that contain maths, which then shows as TeX when offline.

Repository tooling, not part of the `ncf` package: `python -m tools.docs` (`make docs`).
"""
from __future__ import annotations
import argparse, configparser, hashlib, html, os, re, shutil, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path
from ncf.core import NCFError
from tools.repo import repo_root, directives, doc_cells


# ## Pages
#
# One page per notebook of `nbs/`, in reading order: the index (the README's notebook) first, then
# the tutorials, the reference notebooks of `nbs/api/` by number (the layer), and the explanations.
# Pages sit side by side in the site, so notebook names are unique across the folders. A page's title and description are nbdev's: the first markdown cell's
# `# title` and `> description`.

SECTIONS = ("", "tutorials", "api", "explanations")   # nbs/ itself (the index), then its folders in reading order

def _section(p:Path, nbs:Path) -> str:
    folder = p.parent.relative_to(nbs).as_posix()
    return "" if folder == "." else folder

def pages(root=None) -> list[Path]:
    "The notebooks of the site, in reading order: `index.ipynb`, the tutorials, the reference (`api/`), the explanations."
    nbs = repo_root(root)/"nbs"
    found = [p for p in nbs.rglob("*.ipynb") if _section(p, nbs) in SECTIONS and not p.name.startswith(("_", "."))]
    return sorted(found, key=lambda p: (p.stem != "index", SECTIONS.index(_section(p, nbs)), p.name))

def page_name(nb_path) -> str: return Path(nb_path).stem + ".html"

def title_of(nb, default:str="") -> tuple[str, str]:
    "`(title, description)` from the notebook's first markdown cell (`# title`, `> description`)."
    md = next((c.source for c in nb.cells if c.cell_type == "markdown"), "")
    t = re.search(r"^#\s+(.+)$", md, re.M); d = re.search(r"^>\s*(.+)$", md, re.M)
    return (t.group(1).strip() if t else default), (d.group(1).strip() if d else "")


# ## Executing
#
# `mark_skipped` tags the cells `nbdev_test` would not run. A notebook's failure does not stop the
# others: the build executes everything, then reports every notebook that failed, with the cell
# and the error. `allow_errors=True` renders the errors into the pages instead (useful to look at a
# broken notebook; `make docs` does not).
#
# Executed notebooks can be kept in a `cache` folder, keyed by a hash of the notebook, the package
# source and `NCF_SMALL`: a second build with nothing changed only renders. The test suite uses this
# to build the site once for both its docs and its browser tests.

SKIP_TAG = "skip-execution"   # nbclient's own tag for cells it must not run

def _settings(root) -> configparser.SectionProxy:
    cfg = configparser.ConfigParser(interpolation=None); cfg.read(Path(root)/"settings.ini")
    return cfg["DEFAULT"]

def mark_skipped(nb, flags=("notest", "slow")) -> int:
    "Tag the cells `nbdev_test` skips (`eval: false`, test flags, calls of nbdev_export); return how many."
    n = 0
    for c in nb.cells:
        if c.cell_type != "code": continue
        d = directives(c.source)
        if "eval:false" in d or set(flags) & d or "nbdev_export" + "(" in c.source:  # split: nbdev_test skips cells that contain the call
            tags = c.metadata.setdefault("tags", [])
            if SKIP_TAG not in tags: tags.append(SKIP_TAG)
            n += 1
    return n

def execute(nb_path, timeout:int=900, small:bool=True, allow_errors:bool=False, flags=("notest", "slow")):
    "Run a notebook in a fresh `python3` kernel, in its own folder; return the executed notebook."
    import nbformat
    from nbclient import NotebookClient
    nb_path = Path(nb_path)
    nb = nbformat.read(nb_path, as_version=4)
    mark_skipped(nb, flags)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=allow_errors,
                            resources={"metadata": {"path": str(nb_path.parent)}},
                            extra_arguments=["--IPKernelApp.log_level=ERROR"])
    client.execute(env={**os.environ, "NCF_SMALL": "1" if small else "", "MPLBACKEND": "module://matplotlib_inline.backend_inline"})
    return nb

def _source_hash() -> str:
    import ncf
    h = hashlib.sha256()
    root = Path(ncf.__file__).parent
    for name in sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py")): h.update(name.encode()); h.update((root/name).read_bytes())
    return h.hexdigest()

def cache_key(nb_path, small:bool=True) -> str:
    "What an executed notebook depends on: its own bytes, the package source, and the data size."
    return hashlib.sha256(Path(nb_path).read_bytes() + _source_hash().encode() + str(bool(small)).encode()).hexdigest()[:20]


# ## Rendering
#
# The template extends nbconvert's JupyterLab template: no require.js (there are no widgets), MathJax
# only where there is maths, and the navigation around the notebook's cells.

TEMPLATE = r"""{%- extends 'index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- if resources.ncf.math -%}{{ super() }}{%- endif -%}{%- endblock html_head_js_mathjax -%}
{%- block extra_css -%}<style type="text/css">{{ resources.ncf.css }}</style>{%- endblock extra_css -%}
{%- block body_header -%}
<body class="jp-Notebook" data-jp-theme-light="true" data-jp-theme-name="JupyterLab Light">
<nav class="ncf-nav" aria-label="pages">{{ resources.ncf.nav }}</nav>
<main>
{%- endblock body_header -%}
{%- block body_footer -%}
{{ resources.ncf.after }}
<footer class="ncf-pager">{{ resources.ncf.pager }}</footer>
</main>
</body>
{%- endblock body_footer -%}
"""

CSS = """
body.jp-Notebook { padding: 0; }
.ncf-nav { position: fixed; top: 0; left: 0; bottom: 0; width: 15rem; overflow-y: auto; padding: 1rem;
           background: #f6f7f9; border-right: 1px solid #dde; font: 14px/1.5 system-ui, sans-serif; box-sizing: border-box; }
.ncf-nav .site { font-weight: 700; font-size: 1.2em; display: block; margin-bottom: .6rem; }
.ncf-nav ol { list-style: none; padding: 0; margin: 0; }
.ncf-nav li a { display: block; padding: .15rem .4rem; border-radius: 4px; text-decoration: none; color: #234; }
.ncf-nav li a[aria-current=page] { background: #dfe7f3; font-weight: 600; }
main { margin-left: 15rem; padding: 1rem 2rem 2rem; max-width: 70rem; }
.ncf-pager { display: flex; justify-content: space-between; border-top: 1px solid #dde; margin-top: 2rem; padding-top: 1rem;
              font: 14px/1.5 system-ui, sans-serif; }
.ncf-contents td { padding: .2rem .8rem .2rem 0; vertical-align: top; }
@media (max-width: 50rem) { .ncf-nav { position: static; width: auto; } main { margin-left: 0; } }
"""

def _link(name:str, text:str, current:bool=False) -> str:
    return f'<a href="{html.escape(name)}"' + (' aria-current="page"' if current else "") + f">{html.escape(text)}</a>"

def navigation(site:list[dict], current:str, title:str) -> dict:
    "The sidebar, the previous/next links and, on the index page, the table of contents."
    nav = f'<a class="site" href="index.html">{html.escape(title)}</a><ol>' + "".join(
        f"<li>{_link(p['page'], p['title'], p['page'] == current)}</li>" for p in site) + "</ol>"
    i = [p["page"] for p in site].index(current)
    prev = _link(site[i-1]["page"], "← " + site[i-1]["title"]) if i > 0 else "<span></span>"
    nxt = _link(site[i+1]["page"], site[i+1]["title"] + " →") if i + 1 < len(site) else "<span></span>"
    after = ""
    if current == "index.html":
        rows = "".join(f"<tr><td>{_link(p['page'], p['title'])}</td><td>{html.escape(p['description'])}</td></tr>" for p in site[1:])
        after = f'<section class="ncf-contents"><h2 id="pages">Pages</h2><table>{rows}</table></section>'
    return {"nav": nav, "pager": prev + nxt, "after": after}


# Links are rewritten after rendering, on the `href` attributes of the page: `X.ipynb#anchor`
# becomes `X.html#anchor` when X is a page of the site; a relative link to another file of the
# repository becomes a link to that file on the repository's web page.

_HREF = re.compile(r'(<a\s[^>]*?\bhref=")([^"]*)(")')   # links only: code shown on a page has `&lt;a`, never `<a`
_EXTERNAL = re.compile(r"^(#|[a-zA-Z][a-zA-Z0-9+.-]*:|//)")

def rewrite_links(text:str, names:set, src_dir:Path, root:Path, repo_url:str="", branch:str="main") -> str:
    "Point notebook links at their pages and other repository files at the repository's web page."
    def fix(m):
        href = html.unescape(m.group(2))
        if not href or _EXTERNAL.match(href): return m.group(0)
        path, _, anchor = href.partition("#"); anchor = f"#{anchor}" if anchor else ""
        if path.endswith(".ipynb") and (page := page_name(path.split("/")[-1])) in names: new = page + anchor
        elif repo_url and (target := (src_dir/path).resolve()).exists() and target.is_relative_to(root):
            new = f"{repo_url.rstrip('/')}/-/blob/{branch}/{target.relative_to(root).as_posix()}{anchor}"
        else: return m.group(0)
        return m.group(1) + html.escape(new) + m.group(3)
    return _HREF.sub(fix, text)

def render(nb, page:str, site:list[dict], title:str="ncf") -> str:
    "One notebook as a page of the site: nbdev's cells, the JupyterLab look, embedded plots, the navigation."
    import jinja2
    from nbconvert import HTMLExporter
    nb.cells = doc_cells(nb.cells)
    info = next(p for p in site if p["page"] == page)
    nb.metadata["title"] = f"{info['heading']} – {title}" if page != "index.html" else title
    math = any(c.cell_type == "markdown" and re.search(r"\$[^$\n]+\$|\\\(|\\\[", c.source) for c in nb.cells)
    exporter = HTMLExporter(template_name="lab", extra_loaders=[jinja2.DictLoader({"ncf.html.j2": TEMPLATE})],
                            template_file="ncf.html.j2", exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nb, resources={"ncf": {"css": CSS, "math": math, **navigation(site, page, title)}})
    return body


# ## Checking the links
#
# Every local `href` of every page must lead to a file of the site; anchors within a page are not
# checked.

class _Hrefs(HTMLParser):
    def __init__(self): super().__init__(); self.hrefs = []
    def handle_starttag(self, tag, attrs): self.hrefs += [v for k, v in attrs if k == "href" and v]

def local_links(page:Path) -> list[str]:
    "The local link targets (`href`s that are neither external nor in-page) of an HTML page."
    p = _Hrefs(); p.feed(Path(page).read_text())
    return [h for h in p.hrefs if not _EXTERNAL.match(h)]

def broken_links(site) -> list[str]:
    "`PAGE -> HREF` for every local link of the site that leads to no file."
    site = Path(site)
    return [f"{page.name} -> {h}" for page in sorted(site.glob("*.html")) for h in local_links(page)
            if not (page.parent/h.partition("#")[0]).is_file()]


# ## Building the site

def _why(e:Exception) -> str:
    "One line on why a notebook failed: the cell's exception (nbclient keeps its name and value), without colours."
    name, value = getattr(e, "ename", type(e).__name__), getattr(e, "evalue", str(e))
    return re.sub(r"\x1b\[[0-9;]*m", "", f"{name}: {value}".strip().splitlines()[0] if value else name)

def build_site(out="_site", root=None, names=None, workers:int=2, timeout:int=900, small:bool=True,
               cache=None, allow_errors:bool=False, log=print) -> list[Path]:
    "Execute and render the notebooks of `nbs/` (or only `names`) into the site folder `out`; return its pages."
    import nbformat
    root = repo_root(root); settings = _settings(root)
    todo = [p for p in pages(root) if not names or p.stem in names]
    if names and (unknown := set(names) - {p.stem for p in todo}): raise NCFError(f"no notebook nbs/{sorted(unknown)[0]}.ipynb")
    flags = tuple(settings.get("tst_flags", "notest").split())
    cache = Path(cache) if cache else None
    t0 = time.perf_counter()

    def run(p:Path):
        hit = cache/f"{p.stem}-{cache_key(p, small)}.ipynb" if cache else None
        if hit and hit.exists(): return p, nbformat.read(hit, as_version=4), None, "cached"
        t = time.perf_counter()
        try: nb = execute(p, timeout, small, allow_errors, flags)
        except Exception as e: return p, None, _why(e), ""
        if hit: hit.parent.mkdir(parents=True, exist_ok=True); nbformat.write(nb, hit)
        return p, nb, None, f"{time.perf_counter() - t:.1f} s"

    with ThreadPoolExecutor(max(1, workers)) as ex:
        done = []
        for p, nb, err, note in ex.map(run, todo):
            log(f"  {p.name:<24} " + (f"FAILED {err}" if err else f"executed ({note})"))
            done.append((p, nb, err))
    if failed := [f"{p.relative_to(root).as_posix()}: {err}" for p, _, err in done if err]:
        raise NCFError("the docs site was not built: these notebooks failed to execute (run them, or `nbdev_test --path NB`, to see why):\n  "
                       + "\n  ".join(failed))
    site = []
    for p, nb, _ in done:
        t, d = title_of(nb, p.stem)
        site.append({"page": page_name(p), "title": p.stem if p.stem != "index" else "Home", "heading": t, "description": d})
    out = Path(out).resolve(); out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".site-", dir=out.parent))
    try:
        names_ = {s["page"] for s in site}
        for p, nb, _ in done:
            page = render(nb, page_name(p), site, settings.get("title", "ncf"))
            page = rewrite_links(page, names_, p.parent, root, settings.get("git_url", ""), settings.get("branch", "main"))
            (stage/page_name(p)).write_text(page)
        if broken := broken_links(stage): raise NCFError("the docs site has broken links:\n  " + "\n  ".join(broken))
        if out.exists(): shutil.rmtree(out)
        stage.rename(out)
    finally: shutil.rmtree(stage, ignore_errors=True)
    log(f"docs site: {len(site)} pages in {out} ({time.perf_counter() - t0:.0f} s); open {out/'index.html'}")
    return [out/s["page"] for s in site]


# The sidebar names each page by its notebook (`21_model.nets`), so the reading order shows; the index
# page's table adds each notebook's description.

def main(argv=None) -> int:
    "`python -m tools.docs [--out _site] [NOTEBOOK ...]`: build the offline docs site."
    p = argparse.ArgumentParser(prog="python -m tools.docs", description="Build the offline HTML docs site from nbs/.")
    p.add_argument("names", nargs="*", help="only these notebooks (names without .ipynb); default: all")
    p.add_argument("--out", default="_site", help="the site folder (replaced when the build succeeds)")
    p.add_argument("--workers", type=int, default=2, help="notebooks executed at once")
    p.add_argument("--timeout", type=int, default=900, help="seconds a cell may run")
    p.add_argument("--cache", default=None, help="keep executed notebooks here; unchanged ones are not run again")
    p.add_argument("--full", action="store_true", help="execute with the full data sizes (NCF_SMALL unset)")
    p.add_argument("--allow-errors", action="store_true", help="render failing notebooks with their errors instead of failing")
    a = p.parse_args(argv)
    try: build_site(a.out, None, a.names or None, a.workers, a.timeout, not a.full, a.cache, a.allow_errors)
    except NCFError as e: print(f"docs: error: {e}", file=sys.stderr); return 1
    return 0

if __name__ == "__main__": sys.exit(main())

