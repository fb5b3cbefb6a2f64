"""The offline docs site (`make docs`): one page per notebook, navigation, working links, rendered plots."""
import base64, re, subprocess, sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from ncf.core import NCFError
from ncf.docs import build_site


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
    notebooks = sorted(p.stem for p in (root/"nbs").glob("*.ipynb"))
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
    pngs = [base64.b64decode(src.split(",", 1)[1]) for src in Page(site/"09_train.html").imgs if src.startswith("data:image/png;base64,")]
    assert pngs and all(p.startswith(b"\x89PNG") and len(p) > 5000 for p in pngs)


def test_pages_show_what_nbdev_shows(site):
    text = "".join(Page(site/"09_train.html").text)
    assert "class TrainConfig" in text and "HR=" in text          # exported code and executed output
    assert "#|" not in text and "default_exp" not in text         # directives stripped, default_exp cell dropped
    assert "from fastcore.test import" not in text                # `#| hide` cells dropped
    html = (site/"98_docs.html").read_text()
    assert "&lt;a href=&quot;06_model.ipynb#NCF&quot;" in html or '&lt;a href="06_model.ipynb#NCF"' in html   # code shown as written


def test_cli_rebuilds_from_cache_and_names_failing_notebooks(root, site, tmp_path, tmp_path_factory):
    r = subprocess.run([sys.executable, "-m", "ncf.docs", "--out", str(tmp_path/"s"), "--cache", str(docs_cache(tmp_path_factory)),
                        "index", "06_model"], capture_output=True, text=True, timeout=300, cwd=root)
    assert r.returncode == 0, r.stderr
    assert "cached" in r.stdout and sorted(p.name for p in (tmp_path/"s").glob("*.html")) == ["06_model.html", "index.html"]
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
