"""User hooks: a reference like `models.py:build` (a file beside the study file) or
`package.module:build` in; the function, and the sha256 of the code it came from, out.

Functions handed over from Python (`hpo.tune`) are registered under `python:NAME` for the
process that made them; other processes can only run them when they are importable.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Callable

from hpo.errors import SpecError

PYTHON_PREFIX = "python:"

_registry: dict[str, Any] = {}
_loaded: dict[tuple[str, str], Callable[..., Any]] = {}


def register(name: str, obj: Any) -> str:
    """Make `obj` (a function, or arrays) available to this process as `python:NAME`."""
    ref = f"{PYTHON_PREFIX}{name}"
    _registry[ref] = obj
    return ref


def registered(ref: str) -> Any:
    """What `register` stored under `ref`, or None."""
    return _registry.get(ref)


def split_ref(ref: str, source: str, field: str) -> tuple[str, str]:
    """`where:function` into its two parts.

    Raises:
        SpecError: Not of that form.
    """
    where, sep, function = ref.rpartition(":")
    if not sep or not where or not function.isidentifier():
        raise SpecError(source, field, f'expected "file.py:function" or "package.module:function", got "{ref}"')
    return where, function


def hook_file(ref: str, base_dir: Path | None, source: str, field: str) -> Path | None:
    """The Python file a reference names (None for an importable module or a Python
    object), resolved against the study file's folder.

    Raises:
        SpecError: The file does not exist.
    """
    if ref.startswith(PYTHON_PREFIX):
        return None
    where, _ = split_ref(ref, source, field)
    if not where.endswith(".py"):
        return None
    path = Path(where)
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / path
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise SpecError(source, field, f"{path} {what}; give a Python file relative to the study file's folder "
                                       f"({base_dir or Path.cwd()}), or package.module:function")
    return path


def code_hash(ref: str, base_dir: Path | None, source: str, field: str) -> str | None:
    """sha256 of the file a reference's code lives in (an importable module's file too);
    None for a function handed over from Python."""
    if ref.startswith(PYTHON_PREFIX):
        return None
    path = hook_file(ref, base_dir, source, field)
    if path is None:
        module = _import_module(split_ref(ref, source, field)[0], source, field)
        path = Path(inspect.getfile(module))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_hook(ref: str, base_dir: Path | None, source: str, field: str, *, sha256: str | None = None,
              parameters: int | tuple[int, ...] | None = None) -> Callable[..., Any]:
    """Import the function a reference names (once per process and code version).

    Args:
        ref: `file.py:function`, `package.module:function` or `python:NAME`.
        base_dir: The study file's folder, against which a file is resolved.
        source, field: Where the reference was written, for error messages.
        sha256: The hash the study recorded; the code found now must match it.
        parameters: How many positional arguments the function must take (or the
            counts it may take: a build takes hpo's three or KerasTuner's one).

    Raises:
        SpecError: No such file, module or function, not callable, the wrong number of
            parameters, or code that differs from what the study recorded.
    """
    if ref.startswith(PYTHON_PREFIX):
        obj = _registry.get(ref)
        if obj is None:
            raise SpecError(source, field, f"this study's {field.split('.')[-1]} was handed over from Python "
                                           "(hpo.tune) in another process and is not importable; define it in a "
                                           "module and pass it to hpo.tune from there, or run the study with hpo.tune")
        return _guarded(obj, ref, source, field) if callable(obj) else obj
    found = code_hash(ref, base_dir, source, field)
    if sha256 is not None and found != sha256:
        raise SpecError(source, field, f"the code of {ref} differs from the code this study's trials were fitted "
                                       f"with (recorded sha256 {sha256[:12]}, found {found[:12]}); restore that "
                                       "file, or start a new study with --study-name")
    key = (ref, found or "")
    if key in _loaded:
        return _loaded[key]
    where, name = split_ref(ref, source, field)
    path = hook_file(ref, base_dir, source, field)
    module = _import_file(path, found or "", source, field) if path else _import_module(where, source, field)
    fn = getattr(module, name, None)
    if fn is None:
        defined = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise SpecError(source, field, f"{where} defines no {name}; its functions: {', '.join(defined) or 'none'}")
    if not callable(fn):
        raise SpecError(source, field, f"{where}:{name} is not a function")
    if parameters is not None:
        _check_parameters(fn, parameters, ref, source, field)
    _loaded[key] = _guarded(fn, ref, source, field)
    return _loaded[key]


def _guarded(fn: Callable[..., Any], ref: str, source: str, field: str) -> Callable[..., Any]:
    # A hook runs inside hpo's process: its sys.exit() would end the run (exit 0, nothing
    # said) and leave its trial RUNNING. It becomes the hook's error like any other.
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SystemExit as e:
            raise SpecError(source, field, _exit_message(f"{ref} called", e)) from None

    return call


def _exit_message(who: str, e: SystemExit) -> str:
    return (f"{who} sys.exit({'' if e.code is None else repr(e.code)}), which would end hpo itself; "
            "return a value or raise an exception instead")


def _import_file(path: Path, digest: str, source: str, field: str) -> Any:
    # A module name per file version, so a changed file is never served from the cache;
    # its folder goes on sys.path so that it can import its neighbours.
    name = f"hpo_user_{path.stem}_{digest[:12]}"
    if name in sys.modules:
        return sys.modules[name]
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SystemExit as e:
        raise SpecError(source, field, _exit_message(f"{path} calls, when imported,", e)) from None
    except Exception as e:  # noqa: BLE001 - any error in the user's file is reported as theirs
        raise SpecError(source, field, f"importing {path} failed: {type(e).__name__}: {e}; fix that file") from e
    sys.modules[name] = module
    return module


def _import_module(where: str, source: str, field: str) -> Any:
    try:
        return importlib.import_module(where)
    except ImportError as e:
        raise SpecError(source, field, f"cannot import module {where} ({e}); give a file path ending in .py, "
                                       "or make the module importable (pip install it, or set PYTHONPATH)") from e
    except SystemExit as e:
        raise SpecError(source, field, _exit_message(f"module {where} calls, when imported,", e)) from None
    except Exception as e:  # noqa: BLE001 - any error in the user's module is reported as theirs
        raise SpecError(source, field, f"importing module {where} failed: {type(e).__name__}: {e}; fix it") from e


_CALLS = {3: "build(params, input_shape, n_outputs)", 1: "build(hp) (KerasTuner's form)", 0: "load()"}


def _check_parameters(fn: Callable[..., Any], count: int | tuple[int, ...], ref: str, source: str,
                      field: str) -> None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    counts = count if isinstance(count, tuple) else (count,)
    for n in counts:
        try:
            signature.bind(*range(n))
            return
        except TypeError:
            pass
    # The signature as written (with any `*` or defaults): the bare names can read like the
    # very call that failed, e.g. a keyword-only n_outputs.
    expected = " or ".join(_CALLS[n] for n in counts)
    raise SpecError(source, field, f"{ref} is defined as {getattr(fn, '__name__', 'function')}{signature} but hpo "
                                   f"calls {expected}, passing {'each' if any(counts) else 'no'} argument"
                                   f"{'' if any(counts) else 's'}{' by position' if any(counts) else ''}; change its "
                                   "parameters to match") from None
