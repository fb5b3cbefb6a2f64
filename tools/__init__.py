"""Repository tooling: the checks that keep notebooks, package and README in agreement (`tools.repo`), and the
offline docs site (`tools.docs`). Not part of the `ncf` package: run from the repository root, `python -m tools.repo check`."""
