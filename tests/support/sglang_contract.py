"""SGLang's own contract, read from the pinned package (``make sglang-contract`` puts the ``sglang`` wheel and the
four small packages its argument parser imports into ``.sglang-contract/site``; no CUDA dependency is installed).

Two readers:

- :func:`parse_launch_args` runs SGLang's server-argument parser (``ServerArgs.add_cli_args`` +
  ``ServerArgs.from_cli_args``) on command lines, in a subprocess with the side directory on ``sys.path``.
  ``triton`` and ``IPython`` (imported by ``sglang.srt.utils`` at module level, 286 MB and a notebook shell, used by
  nothing the parser runs) are replaced there by permissive empty modules.
- :func:`http_contract` reads, statically (``ast``: ``io_struct`` imports torchvision), which request class each
  HTTP route of ``sglang.srt.entrypoints.http_server`` parses its JSON body into, the fields of those classes
  (``sglang.srt.managers.io_struct``, inherited fields included) and of ``SamplingParams``.

Run as a script (``python sglang_contract.py`` with the side directory on PYTHONPATH) it is the subprocess end of
:func:`parse_launch_args`: JSON list of argv lists on stdin, JSON list of results on stdout.
"""
from __future__ import annotations

import ast
import functools
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SGLANG_VERSION = "0.5.23"
"""The pinned version (Makefile: SGLANG_VERSION; setup.py's GPU extra)."""
REPO = Path(__file__).resolve().parents[2]
STUBBED = ("triton", "IPython")
"""Top-level packages the parser's import chain names but never uses on this path."""


def contract_site() -> Path:
    """The side directory holding the unpacked ``sglang`` package (``$SGLANG_CONTRACT_SITE`` overrides)."""
    return Path(os.environ.get("SGLANG_CONTRACT_SITE", REPO / ".sglang-contract" / "site"))


def unavailable_reason() -> str | None:
    """None when the pinned sglang package is in :func:`contract_site`, else why the contract tests must skip."""
    site = contract_site()
    info = sorted(site.glob("sglang-*.dist-info"))
    if not (site / "sglang" / "srt" / "server_args.py").exists() or not info:
        return (f"sglang=={SGLANG_VERSION} is not unpacked in {site}; run `make sglang-contract` (needs network "
                f"once, ~41 MB)")
    if info[-1].name != f"sglang-{SGLANG_VERSION}.dist-info":
        return f"{site} holds {info[-1].name}, not sglang {SGLANG_VERSION}; rerun `make sglang-contract`"
    return None


def require_sglang() -> None:
    """Fail the calling test (never skip it) when the pinned package is missing: the stand-in and the rendezvous
    tests run SGLang's own code, and a run without it would test nothing of SGLang."""
    reason = unavailable_reason()
    if reason is not None:
        import pytest

        pytest.fail(f"SGLang's own code is needed here and is missing: {reason}", pytrace=False)


# ---- server arguments (subprocess) --------------------------------------------------------------------------
def parse_launch_args(argvs: list[list[str]], *, timeout_s: float = 300.0) -> list[dict[str, Any]]:
    """Parse each argv (the arguments after ``python -m sglang.launch_server``) with SGLang's own parser.

    Returns:
        Per argv ``{"ok": True, "values": {dest: value}}`` with the parsed value of every flag in the argv, or
        ``{"ok": False, "error": "..."}`` with SGLang's message.

    Raises:
        RuntimeError: the subprocess could not import SGLang (message has its stderr).
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(contract_site()), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__], input=json.dumps(argvs), capture_output=True, text=True,
                          env=env, timeout=timeout_s, cwd=str(contract_site()))
    if proc.returncode != 0:
        raise RuntimeError(f"sglang argument parser failed to run (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def stub_unused_packages() -> None:
    """Make ``import triton`` / ``import IPython`` yield permissive empty modules (in this process only)."""
    import importlib.abc
    import importlib.machinery
    import types

    class Anything(types.ModuleType):
        """Any attribute is another such module, or a class for CamelCase names; calling it decorates."""

        def __init__(self, name: str) -> None:
            super().__init__(name)
            self.__path__ = []

        def __getattr__(self, name: str) -> Any:
            if name.startswith("__"):
                raise AttributeError(name)
            value = type(name, (), {}) if name[:1].isupper() else Anything(f"{self.__name__}.{name}")
            setattr(self, name, value)
            return value

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            if len(args) == 1 and callable(args[0]) and not kwargs:
                return args[0]
            return lambda fn: fn

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
            if fullname.split(".")[0] in STUBBED:
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec: Any) -> Any:
            return Anything(spec.name)

        def exec_module(self, module: Any) -> None:
            pass

    sys.meta_path.insert(0, Finder())


def _parse_main() -> None:
    import argparse
    import contextlib
    import io

    stub_unused_packages()
    from sglang.srt.server_args import ServerArgs

    results = []
    for argv in json.loads(sys.stdin.read()):
        parser = argparse.ArgumentParser(prog="sglang.launch_server")
        ServerArgs.add_cli_args(parser)
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                namespace = parser.parse_args(argv)
            server_args = ServerArgs.from_cli_args(namespace)
        except SystemExit:
            results.append({"ok": False, "error": err.getvalue().strip().splitlines()[-1]})
            continue
        except Exception as exc:  # ServerArgs.__post_init__ validation
            results.append({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
            continue
        dests = {a.dest for a in parser._actions for opt in a.option_strings if opt in argv}
        results.append({"ok": True, "values": {d: _jsonable(getattr(server_args, d, None)) for d in sorted(dests)}})
    print(json.dumps(results))


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, type(None), list)) else repr(value)


# ---- HTTP request classes (static) ----------------------------------------------------------------------------
@dataclass(frozen=True)
class RequestClass:
    """A request class as SGLang declares it: field name -> annotation source, and which fields are required."""

    name: str
    fields: dict[str, str]
    required: frozenset[str]


@dataclass
class HttpContract:
    """Route -> request class name (None: the route reads no JSON body), and the classes' fields."""

    routes: dict[str, str | None] = field(default_factory=dict)
    classes: dict[str, RequestClass] = field(default_factory=dict)
    sampling_params: RequestClass | None = None

    def body_problems(self, route: str, body: Any) -> list[str]:
        """What in ``body`` (a decoded JSON request to ``route``) SGLang's classes do not define."""
        if route not in self.routes:
            return [f"{route}: SGLang serves no such route"]
        cls_name = self.routes[route]
        if cls_name is None:
            return [] if body in (None, {}) else [f"{route}: SGLang reads no body here, got {sorted(body)}"]
        if not isinstance(body, dict):
            return [f"{route}: body is {type(body).__name__}, SGLang parses an object into {cls_name}"]
        cls = self.classes[cls_name]
        problems = [f"{route}: {cls_name} has no field '{k}'" for k in sorted(set(body) - set(cls.fields))]
        problems += [f"{route}: {cls_name} requires '{k}'" for k in sorted(cls.required - set(body))]
        problems += _type_problems(route, cls, body)
        if route == "/generate" and body.get("sampling_params") is not None:
            items = body["sampling_params"]
            for item in items if isinstance(items, list) else [items]:
                unknown = sorted(set(item) - set(self.sampling_params.fields))
                problems += [f"{route}: SamplingParams has no field '{k}'" for k in unknown]
                problems += _type_problems(route, self.sampling_params, item)
        return problems


def _type_problems(route: str, cls: RequestClass, body: dict) -> list[str]:
    return [f"{route}: {cls.name}.{k} is {cls.fields[k]}, got {body[k]!r}" for k in sorted(body)
            if k in cls.fields and not _json_matches(ast.parse(cls.fields[k], mode="eval").body, body[k])]


_JSON_SCALARS = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
                 "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                 "str": lambda v: isinstance(v, str), "bytes": lambda v: isinstance(v, str),  # base64 in JSON
                 "bool": lambda v: isinstance(v, bool), "None": lambda v: v is None}


def _json_matches(node: ast.expr, value: Any) -> bool:
    """Whether a decoded JSON ``value`` fits a type annotation (``typing`` spelling); unknown types pass."""
    if isinstance(node, ast.Constant) and node.value is None:
        return value is None
    if isinstance(node, ast.Name):
        check = _JSON_SCALARS.get(node.id)
        return True if check is None else check(value)
    if not isinstance(node, ast.Subscript) or not isinstance(node.value, ast.Name):
        return True
    outer = node.value.id
    args = list(node.slice.elts) if isinstance(node.slice, ast.Tuple) else [node.slice]
    if outer == "Optional":
        return value is None or _json_matches(args[0], value)
    if outer == "Union":
        return any(_json_matches(a, value) for a in args)
    if outer == "Annotated":
        return _json_matches(args[0], value)
    if outer in ("List", "Set", "Tuple", "list", "set", "tuple"):
        return isinstance(value, list) and (outer.lower() == "tuple" or all(_json_matches(args[0], v) for v in value))
    if outer in ("Dict", "dict"):
        return isinstance(value, dict) and all(_json_matches(args[1], v) for v in value.values())
    if outer == "Literal":
        return value in [a.value for a in args if isinstance(a, ast.Constant)]
    return True


_NO_DEFAULT_CALLS = {"field"}


def _class_fields(tree: ast.Module) -> dict[str, RequestClass]:
    """Every class's annotated fields, with those of base classes defined in the same module first."""
    own: dict[str, tuple[list[str], dict[str, str], set[str]]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields_, required = {}, set()
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                annotation = ast.unparse(stmt.annotation)
                if annotation.startswith(("ClassVar", "typing.ClassVar")):
                    continue
                fields_[stmt.target.id] = annotation
                if stmt.value is None or (isinstance(stmt.value, ast.Call) and ast.unparse(stmt.value.func) in
                                          _NO_DEFAULT_CALLS and not any(k.arg in ("default", "default_factory")
                                                                        for k in stmt.value.keywords)):
                    required.add(stmt.target.id)
        bases = [b.id for b in node.bases if isinstance(b, ast.Name)]
        own[node.name] = (bases, fields_, required)

    def resolve(name: str) -> tuple[dict[str, str], set[str]]:
        bases, fields_, required = own[name]
        merged, req = {}, set()
        for base in bases:
            if base in own:
                f, r = resolve(base)
                merged.update(f)
                req |= r
        merged.update(fields_)
        return merged, (req - set(fields_)) | required

    out = {}
    for name in own:
        f, r = resolve(name)
        out[name] = RequestClass(name, f, frozenset(r))
    return out


def _route_bodies(tree: ast.Module, class_names: set[str]) -> dict[str, str | None]:
    routes: dict[str, str | None] = {}
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        paths = [d.args[0].value for d in node.decorator_list
                 if isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and isinstance(d.func.value, ast.Name)
                 and d.func.value.id == "app" and d.func.attr in ("get", "post", "put", "api_route")
                 and d.args and isinstance(d.args[0], ast.Constant)]
        if not paths:
            continue
        body_cls = None
        for arg in node.args.args + node.args.kwonlyargs:
            if arg.annotation is None:
                continue
            names = {n.id for n in ast.walk(arg.annotation) if isinstance(n, ast.Name)}
            found = sorted(names & class_names)
            if found:
                body_cls = found[0]
        for path in paths:
            routes[path] = body_cls
    return routes


def http_contract(site: Path | None = None) -> HttpContract:
    """Read the routes, request classes and SamplingParams fields from the unpacked sglang package."""
    srt = (site or contract_site()) / "sglang" / "srt"
    io_tree = ast.parse((srt / "managers" / "io_struct.py").read_text())
    classes = _class_fields(io_tree)
    server_tree = ast.parse((srt / "entrypoints" / "http_server.py").read_text())
    routes = _route_bodies(server_tree, {n for n in classes if n.endswith("ReqInput")})
    sampling = _class_fields(ast.parse((srt / "sampling" / "sampling_params.py").read_text()))["SamplingParams"]
    return HttpContract(routes=routes, classes=classes, sampling_params=sampling)


@functools.cache
def cached_http_contract() -> HttpContract:
    """:func:`http_contract` of the default side directory, read once per process."""
    return http_contract()


_CLASS_HEADER = re.compile(r"^class (\w+)(?:\(([^)]*)\))?:", re.MULTILINE)


@functools.cache
def classes_with_get_weights_by_name(site: Path | None = None) -> frozenset[str]:
    """Model classes of ``sglang/srt/models`` that define ``get_weights_by_name`` themselves or inherit it from one
    that does (by base-class name, across files). ``/get_weights_by_name`` calls the served model's method
    (``weight_exporter.py:183``), so every other class fails there (sglang 0.5.23: Qwen2/Qwen3 are not in the set)."""
    bases: dict[str, set[str]] = {}
    defining: set[str] = set()
    for path in sorted(((site or contract_site()) / "sglang" / "srt" / "models").glob("*.py")):
        text = path.read_text()
        # a regex over class headers (ast over ~300 model files takes seconds); a class defines the method when
        # its body has `def get_weights_by_name` before the next top-level class
        for match in _CLASS_HEADER.finditer(text):
            name, parents = match.group(1), match.group(2) or ""
            bases.setdefault(name, set()).update(p.strip().split(".")[-1] for p in parents.split(",") if p.strip())
            body = text[match.end():]
            following = _CLASS_HEADER.search(body)
            if "def get_weights_by_name(" in body[: following.start() if following else len(body)]:
                defining.add(name)
    grew = True
    while grew:
        new = {name for name, parents in bases.items() if parents & defining} - defining
        defining |= new
        grew = bool(new)
    return frozenset(defining)


if __name__ == "__main__":
    _parse_main()
