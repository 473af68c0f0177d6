"""The hand-written ``core/_planner.pyi`` matches the compiled module (parsed with ``ast``; no mypy)."""

import ast
import inspect
import re
import types
from pathlib import Path

import pytest

import dpgather
import dpgather.core
import dpgather.core._planner as planner_mod

CORE = Path(dpgather.core.__file__).resolve().parent
STUB = CORE / "_planner.pyi"
PYX = CORE / "_planner.pyx"
MODNAME = planner_mod.__name__


def stub_tree():
    return ast.parse(STUB.read_text(), filename=str(STUB))


def stub_toplevel(tree):
    """Public names the stub defines (not its imports), name -> node."""
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            out[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    out[t.id] = node
    return {k: v for k, v in out.items() if not k.startswith("_")}


def stub_all(tree):
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return ast.literal_eval(node.value)
    return None


def runtime_public():
    """Public names of the compiled module: __all__ plus whatever it defines itself."""
    names = set(planner_mod.__all__)
    for name in dir(planner_mod):
        if name.startswith("_"):
            continue
        obj = getattr(planner_mod, name)
        if isinstance(obj, types.ModuleType):
            continue
        if getattr(obj, "__module__", None) == MODNAME:
            names.add(name)
    return names


def class_members(node):
    names = {}
    for item in node.body:
        if isinstance(item, ast.FunctionDef):
            names[item.name] = item
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            names[item.target.id] = item
    return names


def test_stub_and_py_typed_exist():
    assert STUB.is_file()
    assert (CORE / "py.typed").is_file()
    assert (Path(dpgather.__file__).resolve().parent / "py.typed").is_file()


def test_stub_parses_and_its_imports_resolve():
    tree = stub_tree()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            mod = __import__(f"dpgather.core.{node.module}", fromlist=["_"])
            for alias in node.names:
                assert hasattr(mod, alias.name), f"{node.module}.{alias.name}"


def test_every_public_name_is_stubbed_and_vice_versa():
    tree = stub_tree()
    stubbed = set(stub_toplevel(tree))
    public = runtime_public()
    assert public - stubbed == set(), "public names missing from _planner.pyi"
    assert stubbed - public == set(), "_planner.pyi declares names the module does not export"
    assert stub_all(tree) == list(planner_mod.__all__)
    for name in stubbed:
        assert hasattr(planner_mod, name)


@pytest.mark.parametrize("cls", ["Plan", "Planner"])
def test_class_members_match(cls):
    node = stub_toplevel(stub_tree())[cls]
    assert isinstance(node, ast.ClassDef)
    stubbed = {n for n in class_members(node) if not n.startswith("_")}
    runtime = {n for n in dir(getattr(planner_mod, cls)) if not n.startswith("_")}
    assert runtime - stubbed == set(), f"{cls} members missing from the stub"
    assert stubbed - runtime == set(), f"stub declares {cls} members that do not exist"


def test_properties_are_properties():
    """Read-only attributes are stubbed as properties, methods as plain defs."""
    for cls in ("Plan", "Planner"):
        obj = getattr(planner_mod, cls)
        for name, item in class_members(stub_toplevel(stub_tree())[cls]).items():
            if name.startswith("_"):
                continue
            is_prop = isinstance(item, ast.FunctionDef) and any(
                isinstance(d, ast.Name) and d.id == "property" for d in item.decorator_list)
            attr = inspect.getattr_static(obj, name)
            assert is_prop == (not callable(attr)), f"{cls}.{name}"


def _stub_params(fn):
    a = fn.args
    params = []
    pos = a.posonlyargs + a.args
    defaults = [None] * (len(pos) - len(a.defaults)) + list(a.defaults)
    for arg, d in zip(pos, defaults):
        params.append((arg.arg, "POSITIONAL_OR_KEYWORD", None if d is None else ast.literal_eval(d)))
    for arg, d in zip(a.kwonlyargs, a.kw_defaults):
        params.append((arg.arg, "KEYWORD_ONLY", None if d is None else ast.literal_eval(d)))
    return params


def _runtime_params(sig):
    return [(p.name, p.kind.name, None if p.default is inspect.Parameter.empty else p.default)
            for p in sig.parameters.values()]


def _stub_functions():
    top = stub_toplevel(stub_tree())
    yield "count_tokens", top["count_tokens"], planner_mod.count_tokens
    yield "plan", top["plan"], planner_mod.plan
    for cls in ("Plan", "Planner"):
        for name, item in class_members(top[cls]).items():
            if isinstance(item, ast.FunctionDef) and not name.startswith("_") and not any(
                    isinstance(d, ast.Name) and d.id == "property" for d in item.decorator_list):
                yield f"{cls}.{name}", item, getattr(getattr(planner_mod, cls), name)


@pytest.mark.parametrize("qualname, node, fn", list(_stub_functions()), ids=lambda x: x
                         if isinstance(x, str) else "")
def test_function_signatures_match(qualname, node, fn):
    assert _stub_params(node) == _runtime_params(inspect.signature(fn)), qualname


def _pyx_init_params(cls):
    src = PYX.read_text()
    m = re.search(rf"^cdef class {cls}\b.*?^    def __init__\((.*?)\):", src, re.S | re.M)
    assert m, cls
    fn = ast.parse(f"def __init__({' '.join(m.group(1).split())}): pass").body[0]
    return _stub_params(fn)


@pytest.mark.skipif(not PYX.is_file(), reason="source checkout only")
@pytest.mark.parametrize("cls", ["Planner"])
def test_init_signature_matches_source(cls):
    # cdef classes' __init__ is a slot wrapper without a signature: compare with the .pyx source
    init = class_members(stub_toplevel(stub_tree())[cls])["__init__"]
    assert _stub_params(init) == _pyx_init_params(cls)


def test_record_constants():
    assert planner_mod.RECORD_WIDTH == 8 == len(planner_mod.RECORD_FIELDS)
    assert planner_mod.RECORD_MAGIC == 0x44504731


@pytest.mark.parametrize("module", [dpgather.core, dpgather])
def test_all_names_resolve(module):
    assert len(set(module.__all__)) == len(module.__all__)
    for name in module.__all__:
        assert getattr(module, name) is not None, name


def test_core_reexports_the_planner():
    for name in planner_mod.__all__:
        assert getattr(dpgather.core, name) is getattr(planner_mod, name)
        assert name in dpgather.core.__all__
