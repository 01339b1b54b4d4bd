"""The README and docs/*.md link to each other without dead ends.

Every relative link ``[text](path)`` or ``[text](path#anchor)`` between README.md and docs/*.md must name a file
that exists, and an ``#anchor`` must be the slug of a heading in that file, made the way GitHub makes them:
lowercase, every character but letters, digits, spaces, ``-`` and ``_`` dropped, spaces turned into ``-``, and the
second, third, ... heading with the same slug suffixed ``-1``, ``-2``, ...
"""
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def slug(heading):
    """GitHub's anchor for a heading's text.

    >>> slug("Training recipes and how well they learn: `bench/bench_quality.py`")
    'training-recipes-and-how-well-they-learn-benchbench_qualitypy'
    """
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(markdown):
    """Every heading anchor of a Markdown text, duplicates numbered as GitHub numbers them."""
    seen, out = {}, set()
    for line in FENCE.sub("", markdown).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(markdown):
    """The link targets of a Markdown text outside code blocks and code spans."""
    text = FENCE.sub("", markdown)
    text = re.sub(r"`[^`\n]*`", "", text)
    return LINK.findall(text)


def test_slugs_and_duplicates_follow_github():
    assert slug("Evaluating your own model: evaluate.py") == "evaluating-your-own-model-evaluatepy"
    assert slug("GPU and clusters") == "gpu-and-clusters"
    assert slug("FastCaloSim input ntuples (ROOT)") == "fastcalosim-input-ntuples-root"
    assert slug("What `make all` does, and what Make redoes") == "what-make-all-does-and-what-make-redoes"
    assert anchors("# A\n## a\n```\n# a\n```\n### A!\n") == {"a", "a-1", "a-2"}
    assert links("[x](a.md#b) `[y](c.md)` ![img](p.png) [z](http://e.org)") == ["a.md#b", "http://e.org"]


def test_docs_exist_and_readme_is_short():
    names = {os.path.basename(p) for p in DOCS}
    assert {"recipes-and-quality.md", "calochallenge-and-ranges.md", "formats-and-exports.md",
            "tests-benchmarks-reliability.md"} <= names
    with open(DOCS[0]) as f:
        assert len(f.read().splitlines()) <= 200


@pytest.mark.parametrize("path", DOCS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_and_anchor_resolves(path):
    with open(path) as f:
        text = f.read()
    checked = 0
    for target in links(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):      # http:, https:, mailto: -- not ours to check
            continue
        file_part, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        assert os.path.exists(dest), f"{os.path.relpath(path, ROOT)}: dead link {target}"
        if anchor:
            assert dest.endswith(".md"), f"{os.path.relpath(path, ROOT)}: anchor into a non-Markdown file {target}"
            with open(dest) as f:
                assert anchor in anchors(f.read()), f"{os.path.relpath(path, ROOT)}: dead anchor {target}"
        checked += 1
    # every document links somewhere: the README to each doc, each doc back to the README
    assert checked > 0


def test_readme_links_every_doc_and_every_doc_links_back():
    with open(DOCS[0]) as f:
        readme_targets = {t.partition("#")[0] for t in links(f.read())}
    for path in DOCS[1:]:
        assert "docs/" + os.path.basename(path) in readme_targets, path
        with open(path) as f:
            assert any(t.partition("#")[0] == "../README.md" for t in links(f.read())), path
