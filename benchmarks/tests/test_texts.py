"""The benchmark texts' pure parts on inline snippets (play_text, doc_text, archive member paths); no network."""

import pytest

from benchmarks.shakespeare import play_text

# Trailing double spaces are markdown line breaks, as in the real files.
SNIPPET = (
    "# Macbeth\n"
    "\n"
    "## ACT I\n"
    "\n"
    "### SCENE I. A desert place.\n"
    "\n"
    "_Thunder and lightning. Enter three Witches_\n"
    "\n"
    "**First Witch**  \n"
    "When shall we three meet again  \n"
    "In thunder, lightning, or in rain?\n"
    "\n"
    "**DUNCAN**  \n"
    "So well thy words become thee as thy wounds;  \n"
    "They smack of honour both. Go get him surgeons.\n"
    "\n"
    "_Exit Sergeant, attended_\n"
    "\n"
    "Who comes here?\n"
    "\n"
    "*Enter King Edward, Derby, and \n"
    "Artois.*\n"
    "\n"
    "**LYSANDER**  \n"
    "__\\[Awaking]_  \n"
    "And run through fire I will for thy sweet sake.  \n"
    "'Ladies,'\\--or 'Fair-ladies, &amp; c.  \n"
    "And _\\[Censorinus,]_  \n"
    "No, no; he'll __\\[ ]_  \n"
    "\n"
    "\n"
    "\n"
    "**PAGE**  \n"
    "[Within]_  \n"
    "Who's there?\n"
)

EXPECTED = (
    "First Witch:\n"
    "When shall we three meet again\n"
    "In thunder, lightning, or in rain?\n"
    "\n"
    "DUNCAN:\n"
    "So well thy words become thee as thy wounds;\n"
    "They smack of honour both. Go get him surgeons.\n"
    "Who comes here?\n"
    "\n"
    "LYSANDER:\n"
    "And run through fire I will for thy sweet sake.\n"
    "'Ladies,'--or 'Fair-ladies, & c.\n"
    "And Censorinus,\n"
    "No, no; he'll\n"
    "\n"
    "PAGE:\n"
    "Who's there?\n"
)


def test_play_text_keeps_speeches_and_drops_markup():
    assert play_text(SNIPPET) == EXPECTED


def test_play_text_is_deterministic_and_clean():
    out = play_text(SNIPPET)
    assert out == play_text(SNIPPET)
    assert "\n\n\n" not in out
    for ch in "#*_\\[]<>":
        assert ch not in out
    assert play_text(SNIPPET.replace("\n", "\r\n")) == out


def test_play_text_empty():
    assert play_text("") == ""
    assert play_text("# Title\n\n_Exeunt_\n") == ""


def test_docutils_text_normalizes_only_whitespace():
    from benchmarks.docutils_docs import doc_text
    assert doc_text("Title\r\n=====  \r\n\r\n\r\n\r\nSome ``code``.   \n\n") == "Title\n=====\n\nSome ``code``.\n"
    assert doc_text("\n\n") == ""


@pytest.mark.parametrize("name", ["../evil.rst", "a/../../evil.rst", "/abs.rst", "C:/x.rst", "a\\b.rst", "a\x00b.rst"])
def test_archive_members_that_could_escape_are_refused(name):
    from benchmarks.pkgdata import member_path
    with pytest.raises(RuntimeError, match="unsafe path"):
        member_path(name, "x.tar.gz")
