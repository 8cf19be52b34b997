"""A vLLM source tree read without importing it: modules, classes, members, signatures.

The compatibility report (``compat.py``) looks up every registry entry's
target in a vLLM tree — the installed one, a git checkout or an unpacked
wheel of any release — by parsing its files with ``ast``. This module is that
reader: where the package is and which version it is, how a dotted target
resolves (re-exports and base classes in other vLLM modules are followed), and
a function's signature and body digest for comparison across versions.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator

FunctionNode = ast.FunctionDef | ast.AsyncFunctionDef
_MAX_DEPTH = 12  # base classes / re-exports followed at most this deep
_VERSION_NAMES = ("__version__", "version")


# ---------------------------------------------------------------- source tree

def find_package_dir(source: str | Path | None = None) -> Path:
    """The ``vllm`` package directory of a source tree, wheel or installation.

    Args:
        source: a directory holding ``vllm/`` (source checkout, unpacked wheel)
            or the ``vllm`` package directory itself; None: the installed vLLM,
            found without importing it.

    Raises:
        FileNotFoundError: no vLLM package there.
    """
    if source is None:
        spec = importlib.util.find_spec("vllm")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("vLLM is not installed (and no --vllm-source given)")
        return Path(list(spec.submodule_search_locations)[0])
    root = Path(source).expanduser().resolve()
    if (root / "vllm").is_dir():
        return root / "vllm"
    if root.is_dir() and (root.name == "vllm" or (root / "__init__.py").is_file()):
        return root
    raise FileNotFoundError(f"{root}: neither a vllm package directory nor a folder holding vllm/")


def _version_in_python(path: Path) -> str | None:
    """A ``__version__ = "..."`` (or ``version = "..."``) string assigned in ``path``."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, ast.AnnAssign) else [])
        value = getattr(node, "value", None)
        if (isinstance(value, ast.Constant) and isinstance(value.value, str)
                and any(isinstance(t, ast.Name) and t.id in _VERSION_NAMES for t in targets)):
            return value.value
    return None


def _version_in_dist_info(package_dir: Path) -> str | None:
    """The version in the METADATA of the distribution that installed ``package_dir``."""
    for metadata in sorted(package_dir.parent.glob("*.dist-info/METADATA")):
        record = metadata.with_name("RECORD")
        text = metadata.read_text(encoding="utf-8", errors="replace")
        name = re.search(r"^Name:\s*(\S+)", text, re.M)
        if not name or not re.fullmatch(r"vllm([-_.].*)?", name.group(1), re.I):
            continue
        if record.is_file() and f"\n{package_dir.name}/__init__.py," not in (
                "\n" + record.read_text(encoding="utf-8", errors="replace")):
            continue  # e.g. vllm_elastic_ft's own dist-info
        version = re.search(r"^Version:\s*(\S+)", text, re.M)
        if version:
            return version.group(1)
    return None


def read_version(package_dir: Path) -> str:
    """vLLM's version, from ``_version.py``, ``version.py`` or the wheel's METADATA."""
    for candidate in (package_dir / "_version.py", package_dir / "version.py"):
        if (version := _version_in_python(candidate)) is not None:
            return version
    return _version_in_dist_info(package_dir) or "unknown"


@dataclass
class Module:
    """One parsed vLLM module: its top-level names and imports."""

    name: str
    path: Path
    tree: ast.Module

    @property
    def is_package(self) -> bool:
        return self.path.name == "__init__.py"

    def top_level(self) -> Iterator[ast.stmt]:
        """Module-level statements, including those under ``if``/``try``/``with``."""
        pending = list(self.tree.body)
        while pending:
            node = pending.pop(0)
            yield node
            if isinstance(node, (ast.If, ast.Try, ast.With)):
                for block in ("body", "orelse", "finalbody"):
                    pending.extend(getattr(node, block, []))
                for handler in getattr(node, "handlers", []):
                    pending.extend(handler.body)

    def definition(self, name: str) -> ast.stmt | None:
        """The last top-level class, function or assignment that binds ``name``."""
        found = None
        for node in self.top_level():
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                found = node if node.name == name else found
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                if name in _bound_names(node):
                    found = node
        return found

    def absolute(self, node: ast.ImportFrom) -> str:
        """The absolute module an ``ImportFrom`` reads (relative imports resolved)."""
        if not node.level:
            return node.module or ""
        parts = self.name.split(".")
        base = parts if self.is_package else parts[:-1]
        base = base[: len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def imported(self, name: str) -> tuple[str, str | None] | None:
        """``(module, attribute)`` that ``name`` was imported as; attribute None: a module."""
        for node in self.top_level():
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        return self.absolute(node), alias.name
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname == name:
                        return alias.name, None
                    if alias.asname is None and alias.name.split(".")[0] == name:
                        return name, None
        return None


class SourceTree:
    """A vLLM package directory whose modules are parsed on demand (and cached)."""

    def __init__(self, package_dir: Path) -> None:
        self.package_dir = package_dir
        self._modules: dict[str, Module | None] = {}

    @cached_property
    def version(self) -> str:
        return read_version(self.package_dir)

    def module_file(self, module: str) -> Path | None:
        """The file of dotted ``module`` (``vllm.x.y``) in this tree, if it has one."""
        top, _, rest = module.partition(".")
        if top != self.package_dir.name:
            return None
        base = self.package_dir.joinpath(*rest.split(".")) if rest else self.package_dir
        for candidate in (base.with_suffix(".py") if rest else None, base / "__init__.py"):
            if candidate is not None and candidate.is_file():
                return candidate
        return None

    def module(self, name: str) -> Module | None:
        """The parsed module, or None when its file is absent or does not parse."""
        if name not in self._modules:
            path = self.module_file(name)
            parsed = None
            if path is not None:
                try:
                    parsed = Module(name, path, ast.parse(path.read_text(encoding="utf-8")))
                except (SyntaxError, ValueError):
                    parsed = None
            self._modules[name] = parsed
        return self._modules[name]


# ---------------------------------------------------------------- AST helpers

def _bound_names(node: ast.stmt) -> set[str]:
    """Plain names an assignment statement binds (tuple targets unpacked)."""
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}


def instance_attributes(cls: ast.ClassDef) -> set[str]:
    """Attributes that the class's own methods assign on their first argument.

    ``self._x = ...``, ``self._x: T = ...``, ``self._x += ...`` and tuple
    targets such as ``(self._a, self._b) = ...`` all count.
    """
    found: set[str] = set()
    for method in cls.body:
        if not isinstance(method, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        args = method.args.posonlyargs + method.args.args
        if not args:
            continue
        receiver = args[0].arg
        for node in ast.walk(method):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and (
                    isinstance(node.value, ast.Name) and node.value.id == receiver):
                found.add(node.attr)
    return found


def _class_member(cls: ast.ClassDef, name: str) -> ast.stmt | None:
    """The last statement of the class body that defines ``name``."""
    found = None
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found = node if node.name == name else found
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and name in _bound_names(node):
            found = node
    return found


def parameters(fn: FunctionNode) -> list[str]:
    """The parameter list, rendered: ``x``, ``y=`` (a default), ``/``, ``*a``, ``*``, ``**k``."""
    a = fn.args
    positional = a.posonlyargs + a.args
    first_default = len(positional) - len(a.defaults)
    out = [arg.arg + ("=" if i >= first_default else "") for i, arg in enumerate(positional)]
    if a.posonlyargs:
        out.insert(len(a.posonlyargs), "/")
    if a.vararg:
        out.append("*" + a.vararg.arg)
    elif a.kwonlyargs:
        out.append("*")
    out += [k.arg + ("=" if d is not None else "") for k, d in zip(a.kwonlyargs, a.kw_defaults)]
    if a.kwarg:
        out.append("**" + a.kwarg.arg)
    return out


def function_kind(fn: FunctionNode) -> str:
    """``[async ]function|method|staticmethod|classmethod|property`` (how it is bound)."""
    names = {d.id if isinstance(d, ast.Name) else getattr(d, "attr", "")
             for d in fn.decorator_list}
    kind = next((k for k in ("staticmethod", "classmethod", "property") if k in names), None)
    if kind is None:
        args = fn.args.posonlyargs + fn.args.args
        kind = "method" if args and args[0].arg in ("self", "cls") else "function"
    return ("async " if isinstance(fn, ast.AsyncFunctionDef) else "") + kind


def signature(fn: FunctionNode) -> list[str]:
    """``function_kind`` followed by ``parameters``: what a wrapper must reproduce."""
    return [function_kind(fn)] + parameters(fn)


def body_digest(fn: FunctionNode) -> str:
    """The function's body as an AST dump, docstring dropped (to see whether it changed)."""
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(
            getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
        body = body[1:]
    return "\n".join(ast.dump(stmt) for stmt in body)


def parameter_names(rendered: list[str]) -> list[str]:
    """Names from ``parameters()`` output (markers and prefixes dropped)."""
    return [p.strip("*=") for p in rendered if p not in ("/", "*")]


def signature_diff(baseline: list[str], current: list[str]) -> str:
    """``"unchanged"`` or ``"changed: ..."`` between two ``signature()`` lists."""
    if baseline == current:
        return "unchanged"
    (old_kind, *old), (new_kind, *new) = baseline, current
    parts = [f"{old_kind} -> {new_kind}"] if old_kind != new_kind else []
    old_names, new_names = parameter_names(old), parameter_names(new)
    removed = [p for p in old_names if p not in new_names]
    added = [p for p in new_names if p not in old_names]
    parts += [f"removed {', '.join(removed)}"] if removed else []
    parts += [f"added {', '.join(added)}"] if added else []
    if old != new and not (removed or added):
        parts.append(f"({', '.join(old)}) -> ({', '.join(new)})")
    return "changed: " + "; ".join(parts)


# ---------------------------------------------------------------- resolution

@dataclass
class Resolution:
    """Where a target was found in a source tree (or why it was not).

    Attributes:
        module_found: the target's module file exists and parses.
        class_found: the class exists; None when the target names no class.
        member_found: the method, attribute or module-level name exists.
        found_in: ``module:qualname`` where the member is defined.
        function: the member's ``def``, when it is a function or method.
        detail: what is missing, when something is.
    """

    module_found: bool = False
    class_found: bool | None = None
    member_found: bool = False
    found_in: str = ""
    function: FunctionNode | None = None
    detail: str = ""

    @property
    def exists(self) -> bool:
        return self.module_found and self.class_found is not False and self.member_found


class Resolver:
    """Looks targets (``module:Class.attr`` or ``module:name``) up in one source tree."""

    def __init__(self, tree: SourceTree) -> None:
        self.tree = tree

    def resolve(self, target: str) -> Resolution:
        module_name, _, qualname = target.partition(":")
        class_path, _, attr = qualname.rpartition(".")
        module = self.tree.module(module_name)
        if module is None:
            return Resolution(detail=f"module {module_name} not found")
        if not class_path:
            return self._module_member(module, attr, _MAX_DEPTH)
        found = self.find_class(module, class_path.split("."), _MAX_DEPTH)
        if found is None:
            return Resolution(module_found=True, class_found=False,
                              detail=f"class {class_path} not found in {module_name}")
        owner, cls = found
        result = self.class_member(owner, cls, attr, _MAX_DEPTH, set())
        result.module_found, result.class_found = True, True
        if not result.member_found:
            result.detail = f"{class_path}.{attr} not found (nor on its resolvable bases)"
        return result

    def _module_member(self, module: Module, name: str, depth: int) -> Resolution:
        node = module.definition(name)
        if node is not None:
            fn = node if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
            return Resolution(True, None, True, f"{module.name}:{name}", fn)
        source = module.imported(name)
        if source is not None and source[1] is not None and depth > 0:
            other = self.tree.module(source[0])
            if other is not None:
                inner = self._module_member(other, source[1], depth - 1)
                if inner.member_found:
                    return inner
            # Imported from outside this tree (or not resolvable): the name exists.
            return Resolution(True, None, True, f"{source[0]}:{source[1]}")
        return Resolution(True, None, False, detail=f"{name} not found in {module.name}")

    def find_class(self, module: Module, path: list[str],
                   depth: int) -> tuple[Module, ast.ClassDef] | None:
        """The class ``path`` (nested names) as seen from ``module``, following imports."""
        if depth <= 0:
            return None
        node = module.definition(path[0])
        if isinstance(node, ast.ClassDef):
            for inner in path[1:]:
                member = _class_member(node, inner)
                if not isinstance(member, ast.ClassDef):
                    return None
                node = member
            return module, node
        source = module.imported(path[0])
        if source is None:
            return None
        module_name, attr = source
        if attr is not None and self.tree.module(f"{module_name}.{attr}") is not None:
            module_name, attr = f"{module_name}.{attr}", None  # ``from pkg import submodule``
        other = self.tree.module(module_name)
        if other is None:
            return None
        return self.find_class(other, ([attr] if attr else []) + path[1:], depth - 1)

    def _base_class(self, module: Module,
                    expr: ast.expr) -> tuple[Module, ast.ClassDef] | None:
        """The class a base-class expression names, if it is in this tree."""
        if isinstance(expr, ast.Subscript):  # Generic[T], Base[T]
            expr = expr.value
        dotted: list[str] = []
        while isinstance(expr, ast.Attribute):
            dotted.insert(0, expr.attr)
            expr = expr.value
        if not isinstance(expr, ast.Name):
            return None
        dotted.insert(0, expr.id)
        # ``mk.Base`` / ``vllm.x.Base``: the longest prefix that is a module.
        for split in range(len(dotted) - 1, 0, -1):
            head = dotted[:split]
            source = module.imported(head[0])
            if source is not None and source[1] is None:
                name = ".".join([source[0]] + head[1:]) if head[0] != source[0] else ".".join(head)
                other = self.tree.module(name)
                if other is not None:
                    return self.find_class(other, dotted[split:], _MAX_DEPTH)
        return self.find_class(module, dotted, _MAX_DEPTH)

    def class_member(self, module: Module, cls: ast.ClassDef, attr: str, depth: int,
                     seen: set[tuple[str, str]]) -> Resolution:
        """``attr`` on ``cls`` or its resolvable bases (depth-first, like the MRO)."""
        key = (module.name, cls.name)
        if depth <= 0 or key in seen:
            return Resolution()
        seen.add(key)
        where = f"{module.name}:{cls.name}.{attr}"
        member = _class_member(cls, attr)
        if member is not None:
            fn = member if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
            return Resolution(member_found=True, found_in=where, function=fn)
        if attr in instance_attributes(cls):
            return Resolution(member_found=True, found_in=where)
        for base in cls.bases:
            found = self._base_class(module, base)
            if found is not None:
                inherited = self.class_member(found[0], found[1], attr, depth - 1, seen)
                if inherited.member_found:
                    return inherited
        return Resolution()
