"""
Command-line configuration for train.py, sample.py and eval_long.py (nanoGPT's "poor man's
configurator", as a function):

    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False

Arguments are applied in order. A config file (plain Python, e.g. config/X.py) runs in a namespace
holding the current value of every key, as in nanoGPT, and may only set known keys; --key=value
overrides one key. Values are Python literals (ast.literal_eval), else plain strings, and must have
the default's type (an int is accepted for a float; a bool must be True or False); a bare --key sets
a bool to True. Mistakes raise ValueError with one line that says how to fix them.
"""
import ast
import difflib
import os
import sys
import traceback
import types

REPO = os.path.dirname(os.path.abspath(__file__))


def configure(defaults, argv, echo=False):
    """Return a copy of defaults (dict) updated by the config files and --key=value overrides in
    argv, applied in order. echo: print each config file and override as it is applied (nanoGPT)."""
    config = dict(defaults)
    for arg in argv:
        if not arg.startswith('--'):  # a config file
            path = find_config_file(arg)
            if echo:
                print(f"Overriding config with {arg}:")
                with open(path) as f:
                    print(f.read())
            for key, value in read_config_file(path, config).items():
                config[key] = check(defaults, key, value, source=arg)
            continue
        key, eq, text = arg[2:].partition('=')
        if not eq:  # --flag alone means --flag=True
            if key in defaults and not isinstance(defaults[key], bool):
                raise ValueError(f"--{key} needs a value: write --{key}=VALUE "
                                 f"(default {defaults[key]!r})")
            text = 'True'
        config[key] = check(defaults, key, parse(text, defaults.get(key)))
        if echo:
            print(f"Overriding: {key} = {config[key]!r}")
    return config


def find_config_file(path):
    if not os.path.isfile(path) and os.path.isfile(os.path.join(REPO, path)):
        path = os.path.join(REPO, path)  # config/X.py works from any directory
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} not found: pass the path of a .py file such as "
                         f"config/train_shakespeare_char.py, and options as --key=value")
    return path


def read_config_file(path, config=None):
    """Execute a config file in a namespace that holds the current value of every key (so it may
    read them, as `lr_decay_iters = max_iters`); return the keys it set. Modules, functions and
    _private names are not keys. A Python error in the file is one line naming the file and line."""
    path = find_config_file(path)
    config = config or {}
    namespace = dict(config)
    with open(path) as f:
        source = f.read()
    try:
        exec(compile(source, path, 'exec'), namespace)
    except SyntaxError as e:
        raise ValueError(f"{path}, line {e.lineno}: {e.msg}: fix the config file") from None
    except Exception as e:
        lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == path]
        where = f", line {lines[-1]}" if lines else ''
        raise ValueError(f"{path}{where}: {type(e).__name__}: {e}: fix the config file") from None
    return {k: v for k, v in namespace.items()
            if not k.startswith('_') and not isinstance(v, types.ModuleType) and not callable(v)
            and (k not in config or v is not config[k])}


def parse(text, default):
    """A Python literal if it is one (3, 1e-3, False, 'x'), otherwise the text itself."""
    if isinstance(default, str):  # a string keeps what was typed: --out_dir=123 is the folder '123'
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def check(defaults, key, value, source='the command line'):
    """value if key is known and value has the default's type (int -> float widened), else raise."""
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults.keys(), n=1)
        hint = f"did you mean {close[0]}?" if close else "--help lists the keys"
        raise ValueError(f"unknown config key {key!r}; {hint} (from {source})")
    default = defaults[key]
    if isinstance(default, bool) or isinstance(value, bool):  # bool is a subclass of int: first
        ok = isinstance(default, bool) and isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        expected = f"of type {type(default).__name__}"
        if isinstance(default, bool):
            expected = 'True or False'
        raise ValueError(f"{key} must be {expected} like its default {default!r}, got {value!r} "
                         f"(from {source})")
    return value


def configure_or_exit(defaults, argv, echo=False):
    """configure() for a script: --help lists the keys; a mistake: one line on stderr, status 2."""
    if '-h' in argv or '--help' in argv:
        print(f"usage: python {script_name()} [config/FILE.py ...] [--key=value ...]")
        print("keys and their defaults:")
        print('\n'.join(f"  --{k}={v!r}" for k, v in defaults.items()))
        sys.exit(0)
    try:
        return configure(defaults, argv, echo)
    except ValueError as e:
        die(e, status=2)


def die(message, status=1):
    """Stop with one line on stderr and no traceback: what went wrong and how to fix it."""
    print(f"{script_name()}: error: {message}", file=sys.stderr)
    sys.exit(status)


def script_name():
    return os.path.basename(sys.argv[0])
