"""How each target shows a value as itself: the markup of each chat robot, and HTML.

A value comes from the callback, which anyone who reaches the receiver can forge. It
must not make a link, a mention, a tag or a line of its own in the message, and it
should read as it was sent: so only what would change the rendering in that target's
dialect is touched, the way that dialect allows.

- Every target: a value's line breaks become spaces (it cannot start a line that passes
  for one of the message's own).
- Feishu's card markdown takes HTML character references (its documentation lists them
  for its special characters): `<` (tags: `<at id=all>`, `<font>`, `<link>`), `&` that
  could start a reference, `]` that could end a link's text, `*`, `~~`, `` ` ``, `_` at a
  word's edge, and what would start a heading, quote or list item.
- WeCom's and DingTalk's markdown document no escape, and show character references as
  written: there a zero-width space (U+200B) goes inside what would be markup, `<` + it
  (tags, WeCom's `<@userid>` mention), `&` + it (a reference, in case a client decodes
  one before parsing), `]` + it before `(` / `[` / `:` (links), `*` + it before `*`
  (bold), and before a heading, quote or list marker that starts the value.
  A single `*`, `_` or `` ` `` may still set a part in italics or code: cosmetic, no link.
- Feishu's plain text parses `<at user_id="all">`: `<` and `&` + zero-width space too.
  WeCom's and DingTalk's plain text mention nobody by text.
- Slack's mrkdwn: `&`, `<`, `>` as Slack documents (`&amp;` ...): its links and mentions
  (`<https://x|text>`, `<@U123>`, `<!channel>`) all need `<`. It has no escape for `*`,
  `_`, `~`, `` ` ``.
- HTML (e-mail): HTML's own escaping.
A bare URL is a link in most clients whatever we send; it shows where it goes.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from dataclasses import dataclass

ZERO_WIDTH_SPACE = "\u200b"


def _plain_link(text: str, url: str) -> str:
    return f"{text}: {url}"


@dataclass(frozen=True, slots=True)
class Markup:
    """How a target writes a bold label, a line break, a link of ours (text and URL from
    the config, never from a callback), and a value as itself."""

    bold: Callable[[str], str]
    escape: Callable[[str], str]
    newline: str = "\n"
    link: Callable[[str, str], str] = _plain_link


def one_line(text: str) -> str:
    """A value's own line breaks would let it start lines that pass for the message's."""
    return " ".join(text.splitlines())


# What opens a tag, an autolink or a mention: < and a letter, / ! ? or @; and a character
# reference (&#60;), which a client decoding references before it parses would make one.
_TAG_OPEN = re.compile(r"<(?=[A-Za-z/!?@])|&(?=[#A-Za-z])")
# What ends a link's text: [text](url), [text][ref], [ref]: url.
_LINK_TEXT_END = re.compile(r"\](?=[(\[:])")
_STRONG = re.compile(r"\*(?=\*)")
# What makes a block at a line's start: heading, quote, list item, heading underline.
_BLOCK_START = re.compile(r"^(\s*)(#|>|[-+*=]|\d+[.)])")


def _break_markdown(text: str) -> str:
    """WeCom and DingTalk: a zero-width space inside what would be markup."""
    text = _TAG_OPEN.sub(_then_zero_width, one_line(text))
    text = _LINK_TEXT_END.sub("]" + ZERO_WIDTH_SPACE, text)
    text = _STRONG.sub("*" + ZERO_WIDTH_SPACE, text)
    return _BLOCK_START.sub(lambda m: m[1] + ZERO_WIDTH_SPACE + m[2], text, count=1)


def _reference(text: str) -> str:
    return "".join(f"&#{ord(character)};" for character in text)


# Feishu: each piece that would be markup, as character references.
_FEISHU_SPECIAL = re.compile(
    r"<"  # a tag
    r"|&(?=[#A-Za-z])"  # a character reference
    r"|\](?=[(\[:])"  # the end of a link's text
    r"|[*`]"  # emphasis, code
    r"|~~"  # strikethrough
    r"|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])"  # emphasis with _ (not inside a word: video_id)
)


def _feishu_escape(text: str) -> str:
    text = _FEISHU_SPECIAL.sub(lambda m: _reference(m.group()), one_line(text))
    # The marker's last character is enough: "#", "-", the "." of "1.".
    return _BLOCK_START.sub(lambda m: m[1] + m[2][:-1] + _reference(m[2][-1]), text, count=1)


def _feishu_text_escape(text: str) -> str:
    return _TAG_OPEN.sub(_then_zero_width, one_line(text))


def _then_zero_width(match: re.Match[str]) -> str:
    return match.group() + ZERO_WIDTH_SPACE


def _slack_escape(text: str) -> str:
    return one_line(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _markdown_bold(label: str) -> str:
    return f"**{label}**"


def _markdown_link(text: str, url: str) -> str:
    # A parenthesis or a space would end the link's URL early.
    url = url.replace("(", "%28").replace(")", "%29").replace(" ", "%20")
    return f"[{text}]({url})"


def _slack_link(text: str, url: str) -> str:
    url = url.replace("|", "%7C").replace("<", "%3C").replace(">", "%3E")
    return f"<{url}|{text}>"


def _html_link(text: str, url: str) -> str:
    return f'<a href="{html.escape(url)}">{html.escape(text)}</a>'


# Plain text as it is (e-mail); in a chat message, on one line.
TEXT = Markup(bold=lambda label: label, escape=lambda text: text)
CHAT_TEXT = Markup(bold=lambda label: label, escape=one_line)
FEISHU_TEXT = Markup(bold=lambda label: label, escape=_feishu_text_escape)
WECOM_MARKDOWN = Markup(bold=_markdown_bold, escape=_break_markdown, link=_markdown_link)
# DingTalk's markdown joins single newlines into one paragraph.
DINGTALK_MARKDOWN = Markup(
    bold=_markdown_bold, escape=_break_markdown, newline="\n\n", link=_markdown_link
)
FEISHU_MARKDOWN = Markup(bold=_markdown_bold, escape=_feishu_escape, link=_markdown_link)
SLACK = Markup(bold=lambda label: f"*{label}*", escape=_slack_escape, link=_slack_link)
HTML = Markup(
    bold=lambda label: f"<b>{label}</b>",
    escape=lambda text: html.escape(text, quote=False),
    newline="<br>\n",
    link=_html_link,
)
