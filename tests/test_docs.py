"""The README's links into docs/ land on a file and a heading that exist (GitHub's anchor rule)."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ['README.md', 'docs/attention.md', 'docs/results.md', 'docs/guide.md']


def anchors(path):
    """GitHub's heading ids: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    with open(path, encoding='utf-8') as f:
        text = re.sub(r'```.*?```', '', f.read(), flags=re.S)  # '#' in code blocks is no heading
    heads = re.findall(r'^#+ (.+)$', text, flags=re.M)
    return {re.sub(r'[^\w\- ]', '', h.strip().lower()).replace(' ', '-') for h in heads}


def links(page):
    with open(os.path.join(ROOT, page), encoding='utf-8') as f:
        return re.findall(r'\]\(([^)\s]+)\)', f.read())


@pytest.mark.parametrize('page', PAGES)
def test_every_local_link_lands_on_a_file_and_heading(page):
    here = os.path.dirname(os.path.join(ROOT, page))
    for link in links(page):
        if link.startswith('http'):
            continue
        target, _, anchor = link.partition('#')
        path = os.path.normpath(os.path.join(here, target)) if target else os.path.join(ROOT, page)
        assert os.path.exists(path), f"{page}: {link} names a file that is not there"
        if anchor:
            assert anchor in anchors(path), f"{page}: {link} names no heading of {target or page}"


def test_the_anchor_rule_on_headings_with_punctuation(tmp_path):
    page = tmp_path / 'p.md'
    page.write_text("# Memory against a K/V cache (GPT-2 124M shape)\n```\n# not a heading\n```\n")
    assert anchors(str(page)) == {'memory-against-a-kv-cache-gpt-2-124m-shape'}
