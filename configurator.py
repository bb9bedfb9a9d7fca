"""
Command-line configuration for train.py and sample.py (nanoGPT's "poor man's configurator", as a function):

    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False --stats

Arguments are applied in order: a config file (plain Python, e.g. config/X.py) is executed and may only set
known keys; --key=value overrides one key. Values are Python literals (ast.literal_eval), else plain strings,
and must have the default's type (an int is accepted for a float; a bool must be True or False); a bare --key
sets a bool to True. Mistakes raise ValueError with one line that says how to fix them.
"""
import ast
import difflib
import os
import sys

REPO = os.path.dirname(os.path.abspath(__file__))


def configure(defaults, argv):
    """Return a copy of defaults (dict) updated by the config files and --key=value overrides in argv."""
    config = dict(defaults)
    for arg in argv:
        if not arg.startswith('--'):  # a config file
            for key, value in read_config_file(arg).items():
                config[key] = check(defaults, key, value, source=arg)
            continue
        key, eq, text = arg[2:].partition('=')
        if not eq:  # --flag alone means --flag=True
            if key in defaults and not isinstance(defaults[key], bool):
                raise ValueError(f"--{key} needs a value: write --{key}=VALUE (default {defaults[key]!r})")
            text = 'True'
        config[key] = check(defaults, key, parse(text, defaults.get(key)))
    return config


def read_config_file(path):
    """Execute a config file and return the names it set (modules it imports and _private names are not keys)."""
    if not os.path.isfile(path) and os.path.isfile(os.path.join(REPO, path)):
        path = os.path.join(REPO, path)  # config/X.py works from any directory
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} not found: pass the path of a .py file such as "
                         f"config/train_shakespeare_char.py, and options as --key=value")
    namespace = {}
    with open(path) as f:
        exec(compile(f.read(), path, 'exec'), namespace)
    return {k: v for k, v in namespace.items() if not k.startswith('_') and type(v).__name__ != 'module'}


def parse(text, default):
    """A Python literal if it is one (3, 1e-3, False, 'x'), otherwise the text itself."""
    if isinstance(default, str):  # a string key keeps whatever was typed: --out_dir=123 is the folder '123'
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def check(defaults, key, value, source='the command line'):
    """Return value if key is known and value has the default's type (int -> float widened), else raise."""
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults.keys(), n=1)
        hint = f"did you mean {close[0]}?" if close else "--help lists the keys"
        raise ValueError(f"unknown config key {key!r}; {hint} (from {source})")
    default = defaults[key]
    if isinstance(default, bool) or isinstance(value, bool):  # bool is a subclass of int: check it first
        ok = isinstance(default, bool) and isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        expected = 'True or False' if isinstance(default, bool) else f"of type {type(default).__name__}"
        raise ValueError(f"{key} must be {expected} like its default {default!r}, got {value!r} (from {source})")
    return value


def configure_or_exit(defaults, argv):
    """configure() for a script: --help lists the keys; a mistake is one line on stderr and exit status 2."""
    if '-h' in argv or '--help' in argv:
        print(f"usage: python {script_name()} [config/FILE.py ...] [--key=value ...]\nkeys and their defaults:")
        print('\n'.join(f"  --{k}={v!r}" for k, v in defaults.items()))
        sys.exit(0)
    try:
        return configure(defaults, argv)
    except ValueError as e:
        die(e, status=2)


def die(message, status=1):
    """Stop with one line on stderr and no traceback: what went wrong and how to fix it."""
    print(f"{script_name()}: error: {message}", file=sys.stderr)
    sys.exit(status)


def script_name():
    return os.path.basename(sys.argv[0])
