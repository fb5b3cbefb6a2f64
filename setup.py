"""Install the `ncf` package from `settings.ini` (nbdev 2's single source of project metadata).

The classic nbdev template imported `pkg_resources`, which the setuptools used in pip's build
isolation no longer ships; requirement strings are passed to setuptools as they are instead.
"""
from configparser import ConfigParser
from pathlib import Path

import setuptools

cfg = ConfigParser(delimiters=["="])
cfg.read(Path(__file__).parent / "settings.ini", encoding="utf-8")
cfg = cfg["DEFAULT"]


def reqs(key):
    "Space-separated requirements from `settings.ini`."
    return cfg.get(key, "").split()


extras = {name: reqs(f"{name}_requirements") for name in ("aws", "serve", "spark", "emulate", "dev")}
extras["all"] = sorted({r for name in ("aws", "serve", "spark", "emulate") for r in extras[name]})
# `dev` is everything a contributor needs: notebooks, tests, and every optional runtime.
extras["dev"] = sorted(set(extras["dev"]) | set(extras["all"]))

setuptools.setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    description=cfg["description"],
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    author=cfg["author"],
    author_email=cfg["author_email"],
    license="Apache-2.0",
    url=cfg["git_url"],
    keywords=cfg["keywords"].split(),
    python_requires=f">={cfg['min_python']}",
    packages=setuptools.find_packages(include=["ncf", "ncf.*"]),
    include_package_data=True,
    install_requires=reqs("requirements"),
    extras_require=extras,
    entry_points={
        "console_scripts": cfg.get("console_scripts", "").split(),
        "nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"],
    },
    zip_safe=False,
)
