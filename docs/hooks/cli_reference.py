"""MkDocs hook: the CLI reference page, generated at build time from the Typer app itself.

`on_files` imports `sslam_cli.main.app` (lazily, so that loading the hook costs nothing), turns it into
its click command and adds `reference/cli.md` to the site as a generated file: nothing is written under
`docs/`, and the page always lists the options of the code being documented. Every option is rendered
from click's own help record (`Parameter.get_help_record`), i.e. with the names, metavar, help text and
`[default: ...]` exactly as `sslam COMMAND --help` prints them.
"""

from __future__ import annotations

import re

PAGE = "reference/cli.md"

INTRO = """\
# CLI reference

This page is generated at build time from the `sslam` command-line application itself
(`sslam_cli.main.app`), so it lists exactly the options of the installed code. Each entry is what
`sslam COMMAND --help` prints: names, value type, help text and the default shown in the help.
The command pages under *Commands* explain the options with examples.
"""


def _escape(text: str) -> str:
    """Markdown-escape plain help text, leaving `code spans` as they are."""
    parts = re.split(r"(`[^`]*`)", text)
    out = []
    for part in parts:
        if part.startswith("`") and part.endswith("`") and len(part) >= 2:
            out.append(part)
            continue
        part = part.replace("\\", "\\\\")
        for ch in "*_[]#":
            part = part.replace(ch, "\\" + ch)
        part = part.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        out.append(part)
    return "".join(out)


def _cell(text: str) -> str:
    """A table cell: escaped text, pipes escaped, one line."""
    return _escape(" ".join(text.split())).replace("|", "\\|")


def _paragraphs(text: str) -> str:
    """A docstring-style help text (hard-wrapped, paragraphs split by blank lines) as Markdown."""
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
    return "\n\n".join(_escape(p) for p in paras)


def _code(text: str) -> str:
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _split_record(param, ctx, record: tuple[str, str]) -> tuple[str, str]:
    """(names, metavar) of a parameter's help record, whose first column is `NAMES [METAVAR]`."""
    first = record[0]
    if getattr(param, "param_type_name", "") == "option" and (param.is_flag or param.count):
        return first, ""
    m = re.match(r"^(.*?) (<[^>]*>|\S+)$", first)
    if m is None:
        return first, ""
    return m.group(1), m.group(2)


def _params_table(params, ctx, kind: str) -> list[str]:
    rows = []
    for p in params:
        if p.param_type_name != kind or getattr(p, "hidden", False):
            continue
        record = p.get_help_record(ctx)
        if record is None:
            continue
        names, metavar = _split_record(p, ctx, record)
        rows.append(
            f"| {_code(names)} | {_code(metavar) if metavar else 'flag'} | {_cell(record[1]) or '&nbsp;'} |"
        )
    if not rows:
        return []
    head = "Argument" if kind == "argument" else "Option"
    return [f"| {head} | Type | Description |", "|---|---|---|", *rows, ""]


def _command_section(name: str, cmd, parent_ctx, page: str | None) -> list[str]:
    import click

    ctx = click.Context(cmd, info_name=name, parent=parent_ctx)
    usage = " ".join([ctx.command_path, *cmd.collect_usage_pieces(ctx)])
    anchor = ctx.command_path.replace(" ", "-")
    lines = [f"## {ctx.command_path} {{#{anchor}}}", "", "```text", usage, "```", ""]
    if cmd.help:
        lines += [_paragraphs(cmd.help), ""]
    if page:
        lines += [f"Explained, with examples: [{ctx.command_path}]({page}).", ""]
    params = cmd.get_params(ctx)
    args = _params_table(params, ctx, "argument")
    if args:
        lines += ["**Arguments**", "", *args]
    opts = _params_table(params, ctx, "option")
    if opts:
        lines += ["**Options**", "", *opts]
    return lines


def render(command_pages: dict[str, str] | None = None) -> str:
    """The reference page's Markdown, from the Typer app's click command. `command_pages` maps a
    command's name to its hand-written page (a link relative to this page), where there is one."""
    import click
    import typer

    from sslam_cli.main import app

    group = typer.main.get_command(app)
    root = click.Context(group, info_name="sslam")
    names = group.list_commands(root)
    lines = [INTRO, "## sslam {#sslam}", "", "```text"]
    lines += [" ".join(["sslam", *group.collect_usage_pieces(root)]), "```", ""]
    if group.help:
        lines += [_paragraphs(group.help), ""]
    lines += ["| Command | Summary |", "|---|---|"]
    for name in names:
        sub = group.get_command(root, name)
        lines.append(f"| [`sslam {name}`](#sslam-{name}) | {_cell(sub.get_short_help_str(limit=10_000))} |")
    lines.append("")
    lines += ["**Options**", "", *_params_table(group.get_params(root), root, "option")]
    for name in names:
        page = (command_pages or {}).get(name)
        lines += _command_section(name, group.get_command(root, name), root, page)
    return "\n".join(lines).rstrip() + "\n"


def on_files(files, config, **kwargs):
    from mkdocs.structure.files import File

    pages = {}
    for f in files.documentation_pages():
        parts = f.src_uri.split("/")
        if len(parts) == 2 and parts[0] == "commands" and parts[1].endswith(".md"):
            pages[parts[1][: -len(".md")]] = f"../{f.src_uri}"
    files.append(File.generated(config, PAGE, content=render(pages)))
    return files
