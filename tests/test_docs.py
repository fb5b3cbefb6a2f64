"""The offline docs site (`make docs`): one page per notebook, navigation, working links, rendered plots."""
import base64, re, subprocess, sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from ncf.core import NCFError
from tools.docs import SKIP_TAG, _why, broken_links, build_site, mark_skipped, pages, rewrite_links, title_of
from tools.repo import repo_root


class Page(HTMLParser):
    "The links, images, title and text of an HTML page."
    def __init__(self, path: Path):
        super().__init__(); self.hrefs, self.imgs, self.title, self.text, self._in = [], [], "", [], None
        self.feed(path.read_text())
    def handle_starttag(self, tag, attrs):
        a = dict(attrs); self._in = tag
        if tag == "a" and a.get("href"): self.hrefs.append(a["href"])
        if tag == "img" and a.get("src"): self.imgs.append(a["src"])
    def handle_endtag(self, tag): self._in = None
    def handle_data(self, data):
        if self._in == "title": self.title += data
        if self._in not in ("style", "script"): self.text.append(data)


def docs_cache(tmp_path_factory) -> Path:
    "Executed notebooks shared by the docs and browser tests of one session: the site is executed once."
    return tmp_path_factory.getbasetemp()/"docs-cache"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("docs")/"_site"
    build_site(out, cache=docs_cache(tmp_path_factory), log=print)
    return out


def test_every_notebook_is_a_page(root, site):
    notebooks = sorted(p.stem for p in (root/"nbs").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    assert sorted(p.stem for p in site.glob("*.html")) == notebooks
    index = Page(site/"index.html")
    assert index.title == "ncf"
    assert {f"{n}.html" for n in notebooks} <= set(index.hrefs)          # the index navigates to every page
    for n in notebooks:
        p = Page(site/f"{n}.html")
        assert p.title and "index.html" in p.hrefs, n


def test_every_local_link_resolves(site):
    for page in site.glob("*.html"):
        for href in Page(page).hrefs:
            if re.match(r"^(#|[a-z]+:|//)", href): continue
            assert not href.split("#")[0].endswith(".ipynb"), f"{page.name}: {href} was not rewritten"
            assert (site/href.split("#")[0]).is_file(), f"{page.name}: {href} leads nowhere"


def test_training_page_has_its_plot(site):
    pngs = [base64.b64decode(src.split(",", 1)[1]) for src in Page(site/"32_train.trainer.html").imgs if src.startswith("data:image/png;base64,")]
    assert pngs and all(p.startswith(b"\x89PNG") and len(p) > 5000 for p in pngs)


def test_pages_show_what_nbdev_shows(site):
    text = "".join(Page(site/"31_train.config.html").text + Page(site/"32_train.trainer.html").text)
    assert "class TrainConfig" in text and "HR=" in text          # exported code and executed output
    assert "#|" not in text and "default_exp" not in text         # directives stripped, default_exp cell dropped
    assert "from fastcore.test import" not in text                # `#| hide` cells dropped
    html = (site/"56_pipeline.sagemaker.html").read_text()
    assert "&lt;ts&gt;" in html   # code shown as written (the docs tooling has no page of its own since it left nbs/)


def test_cli_rebuilds_from_cache_and_names_failing_notebooks(root, site, tmp_path, tmp_path_factory):
    r = subprocess.run([sys.executable, "-m", "tools.docs", "--out", str(tmp_path/"s"), "--cache", str(docs_cache(tmp_path_factory)),
                        "index", "21_model.nets"], capture_output=True, text=True, timeout=300, cwd=root)
    assert r.returncode == 0, r.stderr
    assert "cached" in r.stdout and sorted(p.name for p in (tmp_path/"s").glob("*.html")) == ["21_model.nets.html", "index.html"]
    # a notebook that fails to execute fails the build, named, and leaves no half-built site
    repo = tmp_path/"repo"; (repo/"nbs").mkdir(parents=True)
    (repo/"settings.ini").write_text((root/"settings.ini").read_text())
    import nbformat
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# bad"), nbformat.v4.new_code_cell("1/0")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "python3", "language": "python"}
    nbformat.write(nb, repo/"nbs"/"bad.ipynb")
    with pytest.raises(NCFError, match=r"nbs/bad.ipynb: ZeroDivisionError"):
        build_site(tmp_path/"bad-site", root=repo, log=lambda m: None)
    assert not (tmp_path/"bad-site").exists()


# ------------------------------------------------------------------ tools.docs's own examples (from its notebook, 98_docs)

def test_pages_and_titles():
    import nbformat
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# model\n\n> GMF, MLP and NeuMF.")])
    assert title_of(nb) == ("model", "GMF, MLP and NeuMF.")
    assert pages()[0].name == "index.ipynb"
    order = [(p.parent.name, p.name) for p in pages()[1:]]   # the tutorials, the reference, the explanations, each by name
    assert order == sorted(order, key=lambda t: (("tutorials", "api", "explanations").index(t[0]), t[1]))


def test_mark_skipped():
    import nbformat
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in ("#| eval: false\nmain()", "#| slow\nbig()", "x = 1")])
    assert mark_skipped(nb) == 2
    assert [c.metadata.get("tags", []) for c in nb.cells] == [[SKIP_TAG], [SKIP_TAG], []]


def test_rewrite_links():
    root = repo_root()
    assert rewrite_links('<a href="06_model.ipynb#NCF">x</a>', {"06_model.html"}, root/"nbs", root) == '<a href="06_model.html#NCF">x</a>'
    assert (rewrite_links('<a href="../settings.ini">s</a>', set(), root/"nbs", root, "https://gitlab.com/ncf/ncf")
            == '<a href="https://gitlab.com/ncf/ncf/-/blob/main/settings.ini">s</a>')
    for keep in ('<a href="#top">', '<a href="https://nbdev.fast.ai">', '<a href="mailto:a@b.c">', '&lt;a href="06_model.ipynb"&gt;'):
        assert rewrite_links(keep, set(), root/"nbs", root, "https://x") == keep


def test_two_page_site(tmp_path):
    "The index and the first notebook, executed and rendered (the whole site is `make docs`)."
    site_dir = tmp_path/"site"
    built = build_site(site_dir, names=["index", "00_core"], log=lambda m: None)
    assert [p.name for p in built] == ["index.html", "00_core.html"]
    index = (site_dir/"index.html").read_text()
    assert 'href="00_core.html"' in index and "<h1" in index and "#|" not in index
    assert broken_links(site_dir) == []
    core = (site_dir/"00_core.html").read_text()
    assert re.search(r'<a[^>]*aria-current="page"[^>]*>00_core</a>', core) and "default_exp" not in core
    with pytest.raises(NCFError, match="nbs/nope.ipynb"): build_site(site_dir, names=["nope"])
    assert _why(ValueError("bad value\n  more")) == "ValueError: bad value"
