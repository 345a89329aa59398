r"""What the example scripts and the chat share on the command line.

Arguments are parsed by `fire`, as in Meta's scripts, then checked against the entry
point's annotations; options of text (str, lists of str) are taken as written instead, so
that `--system '[x]'` stays text and `--stop 1e3` is not 1000.0, and a list option may be
written as a Python list (`--stop '["\n\n", "def "]'`, its escapes read as Python does).
`--help` is written here from the signature and the docstring: fire's own shows mangled
types and cut defaults, and this module imports neither torch nor fire until after it,
so help is instant. User errors (ValueError, missing files, a model too big, arguments
fire cannot place) end the process with one line on stderr and exit status 2; other
exceptions keep their traceback. `run_commands` does the same for a program of several
commands (`python -m llama.convert to_hf ...`).
"""

import ast
import contextlib
import inspect
import io
import json
import os
import re
import sys
import textwrap
import time
import typing
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

# The small model that ships in this repository, so that everything runs with no download.
DEMO = str(Path(__file__).resolve().parent.parent / "models" / "CodeLlama-demo")
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError, MemoryError)
# Options whose text takes backslash escapes: fire reads them inside a list
# (`--stop '["\n"]'`) but not in a bare string (`--stop '\n'`), and a real newline is
# awkward to type in a shell argument, so both spellings mean a newline.
ESCAPED = ("prompt", "stop", "system")
# What fire is given as the default of a required option, to tell it was left out.
MISSING = object()

# Descriptions of the options that several entry points share; an entry point's own
# docstring (its "Args:" section) describes the rest and may override these.
OPTIONS = {
    "ckpt_dir": "model folder: Meta's format (params.json, consolidated.NN.pth) or a "
                "Hugging Face Llama folder",
    "tokenizer_path": "tokenizer.model to use (none: the one in ckpt_dir)",
    "temperature": "sampling temperature; 0 or less is greedy (always the likeliest token)",
    "top_p": "sample from the smallest set of tokens whose probabilities add up to top_p",
    "max_seq_len": "longest prompt plus answer, in tokens (the KV cache holds this many)",
    "max_batch_size": "prompts generated together (the KV cache holds this many rows); "
                      "more prompts run in several batches",
    "max_gen_len": "most tokens to generate per answer (none: up to max_seq_len)",
    "stream": "print text as it is generated, one prompt at a time",
    "stop": "strings that end an answer (left out of it): a string or a list such as "
            "'[\"\\n\\n\", \"def \"]'; \\n, \\t, \\r and \\\\ are read as escapes",
    "prompt": "a prompt to run instead of the built-in ones; repeat the option for more "
              "(\\n, \\t, \\r and \\\\ are read as escapes)",
    "prompts_file": "a file of prompts to run instead of the built-in ones: a .json file "
                    "holds a list of them, any other file is one prompt, read as is",
    "dtype": "weights and KV cache precision: float32, bfloat16 or float16 (none: bfloat16 "
             "on CUDA, float16 on MPS, float32 on CPU)",
    "device": "cpu, cuda, cuda:N or mps (none: cuda if present, else mps, else cpu)",
    "quantize": "int8 or int4: store the linear layers' weights in 8 or 4 bits (none: "
                "the checkpoint's precision)",
    "draft": "speculative decoding without a second model: lookup (continue n-grams "
             "found in the prompt and the text so far) or int4 (an int4 copy of the model)",
    "draft_ckpt_dir": "speculative decoding with a smaller model of the same tokenizer "
                      "as the draft (for example CodeLlama-7b for 34B)",
    "draft_tokens": "tokens the draft proposes per step",
    "stats": "after each generation, print its tokens per second and the time to the "
             "first token to stderr (--nostats: don't)",
}


def run(main: Callable, argv: Optional[Sequence[str]] = None,
        repeatable: Sequence[str] = ("prompt",), epilog: str = "", prog: Optional[str] = None,
        errors: Tuple[type, ...] = USER_ERRORS, status: int = 2) -> None:
    """Run `main(**options)` from the command line (sys.argv by default). Options named
    in `repeatable` may be given several times; their values are taken as plain text.
    `epilog` ends the help, `prog` names the command there (default: how it was called).
    An exception among `errors` is the user's: one line on stderr and exit `status`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or program_name()
    with user_errors(errors, status):
        # Text options keep their values as written, which fire would read as Python
        # ('[x]' a list, 1e3 1000.0); fire still sees them, to place the positional ones.
        text, argv = take_text(argv, set(text_options(main)) | set(repeatable))
        if "-h" in argv or "--help" in argv:
            print(help_text(main, prog, repeatable, epilog))
            return
        refuse_repeats(main, argv, prog, repeatable)
        given = {name: values if name in repeatable else values[0]
                 for name, values in text.items()}
        options = {**parse(main, argv, prog, given), **given}
        main(**checked(main, options))


def run_commands(commands: Dict[str, Callable], doc: str,
                 argv: Optional[Sequence[str]] = None, **options) -> None:
    """Run `PROG COMMAND [--option value ...]`: commands[COMMAND] through run(), which
    takes `options`. COMMAND may be spelled with hyphens (to-hf for to_hf). `--help` in
    place of a command lists the commands with `doc` (the module's docstring); no command
    or an unknown one prints that list and an error line on stderr, and exits with 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = program_name()
    name = argv[0].replace("-", "_") if argv else ""
    if name in commands:
        run(commands[name], argv[1:], prog=f"{prog} {name}", **options)
        return
    with user_errors():
        if argv[:1] in (["-h"], ["--help"]):
            print(commands_help(commands, doc, prog))
            return
    problem = f"{argv[0]!r} is not a command" if argv else "no command given"
    print(f"{commands_help(commands, doc, prog)}\n\nerror: {problem}; choose one of "
          f"{', '.join(commands)}", file=sys.stderr)
    sys.exit(2)


def commands_help(commands: Dict[str, Callable], doc: str, prog: str) -> str:
    """Usage, the first paragraph of `doc`, each command with the first line of its
    docstring, the rest of `doc`, and where each command's options are described."""
    summary, _, rest = inspect.cleandoc(doc).partition("\n\n")
    width = max(map(len, commands)) + 2
    lines = [f"usage: {prog} COMMAND [--option value ...]", "", summary, "", "commands:"]
    lines += [f"  {name:<{width}}{inspect.cleandoc(fn.__doc__).splitlines()[0]}"
              for name, fn in commands.items()]
    lines += ["", rest, "", f"{prog} COMMAND --help describes the options of COMMAND."]
    return "\n".join(lines)


def program_name() -> str:
    """How the running command was called, for its help: a script's name, or for a
    module of this package run with -m, `python -m llama.<module>`."""
    path = Path(sys.argv[0])
    if path.parent.resolve() == Path(__file__).resolve().parent:
        return f"python -m {__package__}.{path.stem}"
    return path.name


def take_text(argv: List[str], names) -> Tuple[Dict[str, list], list]:
    """The values of `--name value` and `--name=value` for each of `names`, as written,
    and argv with each such pair as one `--name=value` where it stood."""
    given: Dict[str, list] = {}
    rest = []
    args = iter(argv)
    for arg in args:
        name, eq, value = arg[2:].partition("=")
        name = name.replace("-", "_")  # fire takes --ckpt-dir for --ckpt_dir
        if not (arg.startswith("--") and name in names):
            rest.append(arg)
            continue
        if not eq:
            value = next(args, None)
            if value is None:
                raise ValueError(f"--{name} needs a value: --{name} TEXT")
        given.setdefault(name, []).append(value)
        rest.append(f"--{name}={value}")
    return given, rest


def text_options(main: Callable) -> List[str]:
    """main's options of text or lists of text (str, List[str], Optional of either)."""
    return [name for name, hint in typing.get_type_hints(main).items()
            if hint in (str, Optional[str], List[str], Optional[List[str]])]


def refuse_repeats(main: Callable, argv: List[str], prog: str,
                   repeatable: Sequence[str]) -> None:
    """fire keeps the last of an option given twice and drops the others unseen
    (`--stop a --stop b` would stop at b only): refuse that, but for `repeatable` ones."""
    names = set(inspect.signature(main).parameters)
    seen = set()
    for arg in argv:
        name = arg[2:].partition("=")[0].replace("-", "_") if arg.startswith("--") else None
        if name not in names and name and name.startswith("no") and name[2:] in names:
            name = name[2:]  # --nostats is --stats
        if name in names and name not in repeatable:
            if name in seen:
                fix = (" give several as one list: --stop '[\"a\", \"b\"]'"
                       if name == "stop" else f" give it once (see {prog} --help)")
                raise ValueError(f"--{name} is given more than once;{fix}")
            seen.add(name)


def parse(main: Callable, argv: List[str], prog: str, given: dict) -> dict:
    """main's options from argv, parsed by fire, the `given` ones aside. Arguments fire
    cannot place, and a required option left out, raise ValueError (one line, where fire
    would print its usage screen)."""
    import fire

    # fire sees every option as optional, so that a missing one is reported here.
    signature = inspect.signature(main)
    relaxed = signature.replace(parameters=[
        p.replace(default=MISSING) if p.default is p.empty else p
        for p in signature.parameters.values()])

    def arguments(*args, **kwargs):
        return relaxed.bind(*args, **kwargs).arguments

    arguments.__signature__ = relaxed
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            options = dict(fire.Fire(arguments, command=argv, name=prog,
                                     serialize=lambda _: None))
    except fire.core.FireExit:  # also fire's own flags after `--`, which we do not offer
        raise ValueError(f"{fire_error(said.getvalue())} (see {prog} --help)") from None
    missing = [name for name, p in signature.parameters.items() if p.default is p.empty
               and options.get(name, MISSING) is MISSING and name not in given]
    if missing:
        raise ValueError(f"--{missing[0]} is required (see {prog} --help)")
    return options


def fire_error(said: str) -> str:
    """fire's complaint about the arguments, from what it wrote to stderr, in one line."""
    said = re.sub(r"\x1b\[[0-9;]*m", "", said)  # fire colours its "ERROR: " on a terminal
    line = next((line[len("ERROR: "):] for line in said.splitlines()
                 if line.startswith("ERROR: ")), "")
    unplaced = re.fullmatch(r"(?:Cannot find key|Could not consume arg): (.*)", line)
    if unplaced:
        arg = unplaced.group(1)
        return (f"unknown option {arg}" if arg.startswith("-")
                else f"unexpected argument {arg!r}")
    return line or "the arguments cannot be read"


def checked(main: Callable, options: dict) -> dict:
    """Options with the types that main's annotations ask for (fire reads "7" as an int
    and "[1]" as a list), escapes read in the ESCAPED ones."""
    hints = typing.get_type_hints(main)
    out = {}
    for name, value in options.items():
        value = coerce(name, value, hints.get(name, object))
        if name in ESCAPED and value is not None:
            value = [unescape(v) for v in value] if isinstance(value, list) else unescape(value)
        out[name] = value
    return out


def coerce(name: str, value, hint):
    """value as the type `hint` (str, int, float, bool, List[str], Optional[...])."""
    if hint is object:  # not annotated
        return value
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union:
        # --help writes the missing value as "none"; fire knows only "None".
        if value is None or isinstance(value, str) and value.lower() == "none":
            return None
        return coerce(name, value, args[0])
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if typing.get_origin(hint) is list:
        if isinstance(value, str) and value.lstrip().startswith("["):
            value = python_list(name, value)
        items = [value] if isinstance(value, (str, int, float)) else value
        if isinstance(items, (list, tuple)) and not any(isinstance(i, bool) for i in items):
            return [coerce(name, item, args[0]) for item in items]
    if hint is bool:
        raise ValueError(f"--{name} is a switch (--{name} or --no{name}), got {value!r}")
    raise ValueError(f"--{name} takes {type_name(hint)}, got {value!r}")


def python_list(name: str, text: str) -> list:
    """A list option written as a Python list of strings, such as '["\\n\\n", "def "]'
    (its escapes read as Python reads them)."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = None
    if not isinstance(value, list):
        raise ValueError(f"--{name} {text!r} starts like a list but is not one; write a "
                         f"list as '[\"a\", \"b\"]', and text that starts with [ inside "
                         f"one: '[\"[INST]\"]'")
    return value


def unescape(text: str) -> str:
    """Read \\n, \\t, \\r and \\\\ as newline, tab, carriage return and backslash; any
    other backslash stays as it is."""
    table = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
    return re.sub(r"\\([ntr\\])", lambda m: table[m.group(1)], text)


def type_name(hint) -> str:
    if typing.get_origin(hint) is typing.Union:
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return f"{type_name(inner[0])} or none"
    if typing.get_origin(hint) is list:
        return f"list of {type_name(typing.get_args(hint)[0])}"
    return {bool: "switch", int: "int", float: "float", str: "str"}.get(hint, str(hint))


def help_text(main: Callable, prog: str, repeatable: Sequence[str] = (),
              epilog: str = "") -> str:
    """Usage, main's docstring without its Args section, every option with its type,
    default (or `required`) and description, then the epilog."""
    description, described = split_docstring(main.__doc__ or "")
    hints = typing.get_type_hints(main)
    parameters = inspect.signature(main).parameters
    required = "".join(f"--{name} {name.upper()} " for name, param in parameters.items()
                       if param.default is param.empty)
    lines = [f"usage: {prog} {required}[--option value ...]", "", description, "",
             "options:"]
    for name, param in parameters.items():
        text = described.get(name) or OPTIONS.get(name)
        if text is None:
            raise TypeError(f"option {name} of {prog} has no description")
        flag = f"--{name}, --no{name}" if hints.get(name) is bool else f"--{name}"
        kind = "str, repeatable" if name in repeatable else type_name(hints.get(name))
        default = ("required" if param.default is param.empty
                   else f"default: {shown(param.default)}")
        lines.append(f"  {flag}  ({kind}; {default})")
        lines.append(textwrap.fill(text, 88, initial_indent=" " * 6, subsequent_indent=" " * 6))
    lines += ["  -h, --help", "      show this help and exit"] + (["", epilog] if epilog else [])
    return "\n".join(lines)


def shown(default) -> str:
    if isinstance(default, bool):
        return "on" if default else "off"
    return "none" if default is None else str(default)


def split_docstring(doc: str) -> Tuple[str, Dict[str, str]]:
    """(the docstring without its Google-style "Args:" section, {name: description})."""
    doc = inspect.cleandoc(doc)
    head, _, tail = doc.partition("\nArgs:\n")
    described: Dict[str, str] = {}
    rest = []
    name = None
    for line in tail.splitlines():
        match = re.match(r"^ {2,8}(\w+): (.*)$", line)
        if match:
            name = match.group(1)
            described[name] = match.group(2)
        elif name and line.startswith("     ") and line.strip():
            described[name] += " " + line.strip()
        else:
            name = None
            rest.append(line)
    return "\n".join([head.rstrip()] + rest).rstrip(), described


def rank() -> int:
    """This process's rank under torchrun (0 in a plain process); no torch needed."""
    return int(os.environ.get("RANK", 0))


@contextlib.contextmanager
def user_errors(errors: Tuple[type, ...] = USER_ERRORS, status: int = 2):
    """Turn a user error (one of `errors`) into one line on stderr (rank 0 only) and exit
    `status`, and Ctrl-C into a quiet exit (status 130). CODELLAMA_TRACEBACK=1 shows the
    traceback."""
    try:
        yield
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:  # the reader of stdout (`| head`) has gone: nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except errors as e:
        if os.environ.get("CODELLAMA_TRACEBACK"):
            raise
        if rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(status)


def user_prompts(prompt: Optional[List[str]], prompts_file: Optional[str],
                 dialogs: bool = False) -> Optional[list]:
    """The --prompt texts, then those of --prompts_file (a .json file: a list; any other
    file: one prompt, its whole text); None if neither option is given. Each is a str,
    or with `dialogs` also a list of messages."""
    if prompt is None and prompts_file is None:
        return None
    prompts = list(prompt or [])
    if prompts_file is not None:
        prompts += read_prompts_file(Path(prompts_file))
    if not prompts:
        raise ValueError("no prompts given; pass --prompt TEXT or --prompts_file FILE")
    for i, item in enumerate(prompts):
        if not (isinstance(item, str) or dialogs and isinstance(item, list)):
            raise ValueError(f"prompt {i} is a {type(item).__name__}; each prompt must be a "
                             f"string{' or a list of messages' if dialogs else ''}")
    return prompts


def read_prompts_file(path: Path) -> list:
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise ValueError(f"--prompts_file {path}: {e.strerror.lower()}; pass a file of "
                         f"prompts") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts_file {path} is not UTF-8 text ({e.reason} at byte "
                         f"{e.start}); save it as UTF-8") from None
    if path.suffix.lower() != ".json":
        return [text]
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--prompts_file {path} is not valid JSON ({e}); a .json file "
                         f"holds a list of prompts") from None
    if not isinstance(items, list) or not items:
        raise ValueError(f"--prompts_file {path} must hold a non-empty JSON list of prompts")
    return items


def check_prompts(generator, items: list, encode: Callable, label: str = "prompt") -> None:
    """Encode and check every item before any runs, as the examples run them batch by
    batch: an error names its item among all of them, and nothing is half printed.
    `encode(item)` gives the item's prompt tokens, or None for one that will not run."""
    for i, item in enumerate(items):
        try:
            tokens = encode(item)
        except ValueError as e:
            raise ValueError(f"{label} {i}: {e}") from None
        if tokens is not None:
            generator.engine.check_prompt(i, tokens, label)


def batches(items: list, size: int) -> List[list]:
    """items in consecutive groups of at most `size`."""
    return [items[i:i + size] for i in range(0, len(items), max(1, size))]


def build_options(device: Optional[str], dtype: Optional[str],
                  quantize: Optional[str]) -> dict:
    """Llama.build's keyword arguments for --device, --dtype and --quantize (those given),
    checked now, before any model is read."""
    from .loading import model_device, model_dtype

    options = {}
    if device is not None:
        options["device"] = model_device(device)
    if dtype is not None:
        options["dtype"] = model_dtype(dtype, options.get("device"))
    if quantize is not None:  # Llama.build names the choices if this is not one
        options["quantize"] = quantize
    return options


def check_draft(draft: Optional[str], draft_ckpt_dir: Optional[str], draft_tokens) -> None:
    """Refuse bad --draft / --draft_ckpt_dir / --draft_tokens before any model loads."""
    from .drafting import BY_NAME
    from .speculative import check_draft_tokens

    if draft is not None and draft_ckpt_dir is not None:
        raise ValueError("give either --draft or --draft_ckpt_dir, not both")
    if draft is not None and draft not in BY_NAME:
        raise ValueError(f"--draft {draft!r} is not a draft; use {' or '.join(BY_NAME)}, "
                         f"or --draft_ckpt_dir for a draft model")
    if draft_ckpt_dir is not None and not Path(draft_ckpt_dir).is_dir():
        raise ValueError(f"--draft_ckpt_dir {draft_ckpt_dir} is not a folder; pass the draft "
                         f"model's checkpoint folder")
    try:
        check_draft_tokens(draft_tokens)
    except ValueError as e:
        raise ValueError(f"--{e}") from None


def use_draft(generator, draft: Optional[str], draft_ckpt_dir: Optional[str],
              draft_tokens: int, build: dict) -> None:
    """Configure speculative decoding from --draft / --draft_ckpt_dir / --draft_tokens
    (checked by check_draft); `build`: Llama.build's arguments of the target (the draft
    model gets the same)."""
    if draft_ckpt_dir is not None:
        from .generation import Llama
        draft = Llama.build(draft_ckpt_dir, **{**build, "tokenizer_path": None})
    if draft is not None:
        generator.configure(draft=draft, draft_tokens=draft_tokens)


def watch_speed(generator, report: Optional[Callable[[int, float, float], None]] = None) -> None:
    """After each generation of `generator`, call report(tokens made, seconds from the
    call on (prefill included), seconds to the first token); by default print them to
    stderr on rank 0. It times the one generation core that every public method runs
    (Llama.engine.generate), which yields once per step with each row's new token."""
    core = generator.engine.generate
    report = report or print_speed

    def timed(*args, **kwargs):
        start, first, tokens = time.perf_counter(), None, 0
        try:
            for step in core(*args, **kwargs):
                first = first or time.perf_counter()
                tokens += sum(token is not None for token in step)
                yield step
        finally:
            if first is not None:
                report(tokens, time.perf_counter() - start, first - start)

    generator.engine.generate = timed


def print_speed(tokens: int, seconds: float, first: float) -> None:
    if rank() == 0:
        print(f"[{tokens} tokens in {seconds:.2f} s, {tokens / seconds:.1f} tokens/s; "
              f"first token after {first:.2f} s]", file=sys.stderr, flush=True)
