"""Sphinx configuration of the dwops documentation.

Built in CI (``.ci/run``) with warnings as errors::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

The pages are MyST Markdown; those with a ``kernelspec`` in their front matter are text-based
notebooks that myst-nb executes on every build, so every example on the site has just run.
"""

import os
import sys

# Document (and execute against) this checkout even when it is not installed.
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)

import dwops  # noqa: E402

project = "dwops"
author = "the dwops authors"
copyright = "2026, the dwops authors"
version = release = dwops.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb"}
exclude_patterns = ["_build", "jupyter_execute", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]
root_doc = "index"

# -- MyST / myst-nb
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3
nb_execution_mode = "force"  # every build runs every example
nb_execution_raise_on_error = True  # an example that fails fails the build
nb_execution_show_tb = True
nb_execution_timeout = 180  # seconds per cell
nb_execution_in_temp = False  # cells run in docs/, so ../benchmarks is the repository's
nb_merge_streams = True
nb_render_markdown_format = "myst"  # Markdown outputs (the results tables) may hold tables

# -- autodoc
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the docstrings give shapes and types
napoleon_google_docstring = True
napoleon_numpy_docstring = True

# -- HTML
# pydata-sphinx-theme (as NumPy and CuPy use): a wide content column, tables that scroll sideways
# inside their container, a page table of contents on the right.
html_theme = "pydata_sphinx_theme"
html_title = f"dwops {release}"
html_static_path = ["_static"]
html_css_files = ["dwops.css"]
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "header_links_before_dropdown": 6,
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
# The sections are in the top bar; no left sidebar, so the article (and its tables) get the width.
html_sidebars = {"**": []}
