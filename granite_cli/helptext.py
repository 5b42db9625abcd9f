"""How the command line looks: plain help that is never cut (piped, it wraps at 100 columns, and
every option name, choice, default and environment variable is shown whole), flags shown as
flags, arguments by name (`SOURCE QUESTION`), and one style for every usage error: one line,
`error: --dpi 20: ...`, exit code 2 — the library's own messages and the parser's alike.
"""

from __future__ import annotations

import contextlib
import sys
from enum import Enum

import typer
from typer.core import TyperCommand, TyperGroup

from .errors import silence_stdout

#: Width of help that goes to a pipe or a file: wide enough that little wraps, and nothing is cut.
PIPED_WIDTH = 100


class Command(TyperCommand):
    """A command whose help lists arguments, then options by panel, then its examples."""

    def format_usage(self, ctx, formatter) -> None:
        formatter.write_usage(ctx.command_path, self._usage(ctx))

    def _usage(self, ctx) -> str:
        arguments = [_argument_name(param) for param in self.get_params(ctx) if param.param_type_name == "argument"]
        return " ".join(["[OPTIONS]", *arguments])

    def format_help(self, ctx, formatter) -> None:
        params = self.get_params(ctx)
        arguments = [(_argument_name(p), _describe(p)) for p in params if p.param_type_name == "argument"]
        sections = ([("Arguments", arguments)] if arguments else []) + _panels(params)
        _write_help(formatter, ctx, self._usage(ctx), sections)


class Group(TyperGroup):
    """The `granite-vision` group: the same plain help, and usage errors as one line."""

    def format_help(self, ctx, formatter) -> None:
        commands = [(name, (self.get_command(ctx, name).help or "").split("\n")[0]) for name in self.list_commands(ctx)]
        sections = [("Commands", commands), *_panels(self.get_params(ctx))]
        _write_help(formatter, ctx, "[OPTIONS] COMMAND [ARGS]...", sections)

    def make_context(self, *args, **kwargs):
        with _process_endings():  # --help and --version print while the arguments are parsed
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _process_endings():
            return super().invoke(ctx)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as exc:  # the parser's errors: one line, like the library's
            if type(exc).__name__ == "NoArgsIsHelpError":
                print(exc.format_message())
            else:
                print(f"error: {_one_line(exc, args)}", file=sys.stderr)
            sys.exit(exc.exit_code)
        sys.exit(code or 0)


@contextlib.contextmanager
def _process_endings():
    """stdout's reader gone (`--version | head -c0`): end as a writer to a closed pipe does, 141,
    silently; click would say nothing and exit 1, as if the command had failed. And a Ctrl-C
    (SIGTERM too) that ends the run before its records flow, in the group's set-up or in a
    command, where typer would end silently with 130: "interrupted", exit 130."""
    try:
        yield
    except BrokenPipeError:
        silence_stdout()
        raise typer.Exit(141) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        raise typer.Exit(130) from None


def _write_help(formatter, ctx, usage: str, sections: list[tuple[str, list[tuple[str, str]]]]) -> None:
    """Help in one layout for the group and each command: usage, what it does, its sections of
    terms (arguments, commands, options by panel), then its examples."""
    command = ctx.command
    formatter.width = _width()
    formatter.write_usage(ctx.command_path, usage)
    formatter.write_paragraph()
    formatter.write_text(command.help or "")
    for title, rows in sections:
        _section(formatter, title, rows)
    if command.epilog:
        formatter.write_paragraph()
        for line in command.epilog.split("\n\n"):
            formatter.write_text(line)


def _width() -> int:
    import shutil

    return shutil.get_terminal_size().columns if sys.stdout is not None and sys.stdout.isatty() else PIPED_WIDTH


def _section(formatter, title: str, rows: list[tuple[str, str]]) -> None:
    """A titled list of terms and their help, wrapped between words only: an option name, a model
    id or an environment variable is never split (so `--help | grep` finds it)."""
    import textwrap

    formatter.write_paragraph()
    formatter.write(f"{title}:\n")
    column = min(max(len(term) for term, _ in rows) + 4, 36)
    for term, text in rows:
        lines = textwrap.wrap(
            text, max(40, formatter.width - column), break_on_hyphens=False, break_long_words=False
        ) or [""]
        if len(term) + 4 > column:  # a long term: its help starts on the next line
            formatter.write(f"  {term}\n")
            lines = [f"{' ' * column}{line}" for line in lines]
        else:
            lines = [f"  {term.ljust(column - 2)}{lines[0]}", *(f"{' ' * column}{line}" for line in lines[1:])]
        formatter.write("\n".join(lines) + "\n")


def _argument_name(param) -> str:
    name = (param.metavar or param.name).upper()
    return f"{name}..." if param.nargs == -1 and not name.endswith("...") else name


def _panels(params) -> list[tuple[str, list[tuple[str, str]]]]:
    """Options by help panel, in the order panels first appear ("Options" for those in none)."""
    panels: dict[str, list[tuple[str, str]]] = {}
    for param in params:
        if param.param_type_name != "option" or param.hidden:
            continue
        names = ", ".join(sorted(param.opts, key=len)) + "".join(f" / {name}" for name in param.secondary_opts)
        metavar = "" if param.is_flag else f" {_metavar(param)}"
        panels.setdefault(param.rich_help_panel or "Options", []).append((names + metavar, _describe(param)))
    return list(panels.items())


def _metavar(param) -> str:
    if param.metavar:
        return param.metavar
    kind = _annotation(param)
    if isinstance(kind, type) and issubclass(kind, Enum):
        return "[" + "|".join(member.value for member in kind) + "]"
    return {int: "N", float: "X"}.get(kind, "TEXT")


def _annotation(param):
    """The parameter's Python type (typer has already taken Optional off it)."""
    return param.type_descriptor.annotation


def _describe(param) -> str:
    """A parameter's help with its default, range and environment variable, whole."""
    extras = []
    default = param.default
    if isinstance(param.show_default, str):
        extras.append(f"default: {param.show_default}")
    elif param.show_default is not False and default is not None and default is not False and default != ():
        extras.append(f"default: {getattr(default, 'value', default)}")
    low, high = param.min, param.max
    if low is not None or high is not None:
        extras.append(
            f"{low}<=x<={high}"
            if low is not None and high is not None
            else f"x>={low}"
            if low is not None
            else f"x<={high}"
        )
    if param.envvar:
        extras.append(f"env var: {param.envvar}")
    if param.required and param.param_type_name == "argument":
        extras.append("required")
    help_text = (param.help or "").strip()
    return " ".join(filter(None, [help_text, f"[{'; '.join(extras)}]" if extras else ""]))


def _one_line(exc, args) -> str:
    """The parser's message as `--option VALUE: reason` (the option and what was given first)."""
    message = " ".join(exc.format_message().split())
    param = getattr(exc, "param", None)
    if param is None or param.param_type_name != "option":
        return message.rstrip(".") + _hint(exc)
    option = max(param.opts, key=len)
    given = _given(param, list(args if args is not None else sys.argv[1:]))
    return f"{option}{' ' + given if given is not None else ''}: {_reason(param, message)}"


def _hint(exc) -> str:
    """What a wrong argument count most likely means: `ask` takes one picture, then one question."""
    command = getattr(exc.ctx, "info_name", None)
    if command == "ask" and "unexpected extra argument" in exc.format_message().lower():
        return (
            ". Hint: ask takes one picture, then one question (quote it: 'What is shown?'); for several pictures:"
            " granite-vision caption a.png b.png --prompt '...'"
        )
    return " (see --help)"


def _reason(param, message: str) -> str:
    """What was expected, in the words the library's own errors use."""
    kind = _annotation(param)
    if isinstance(kind, type) and issubclass(kind, Enum):
        return "expected one of " + "|".join(member.value for member in kind)
    if kind in (int, float):
        expected = "a whole number" if kind is int else "a number"
        low, high = param.min, param.max
        bounds = [f"at least {low}" if low is not None else "", f"at most {high}" if high is not None else ""]
        return " ".join(["expected", expected, " and ".join(filter(None, bounds))]).strip()
    return message.split(": ", 1)[-1] if message.startswith("Invalid value") else message


def _given(param, argv: list[str]) -> str | None:
    for index, token in enumerate(argv):
        for name in param.opts:
            if token == name and index + 1 < len(argv):
                return argv[index + 1]
            if token.startswith(name + "="):
                return token.split("=", 1)[1]
    return None
