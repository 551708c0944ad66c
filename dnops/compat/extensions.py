"""The compiled extensions DETR codebases build for their deformable attention, provided by dnops under the names
those codebases import: nothing to build, every device and dtype dnops runs.

================================  ===============================================  ==============================
import name                       imported by                                      interface
================================  ===============================================  ==============================
``MultiScaleDeformableAttention`` Deformable-DETR, DINO, DN-DETR, Mask2Former,     Deformable-DETR's
                                  OneFormer, MaskDINO (``import ... as MSDA``)
``groundingdino._C``              GroundingDINO (``from groundingdino import _C``) Deformable-DETR's
``detrex._C``                     detrex (``from detrex import _C``)               Deformable-DETR's; DCNv3's
                                                                                   ops raise, naming the op
``mmcv._ext``                     mmcv's ops (``ext_loader.load_ext('_ext', ..)``) mmcv's: the backward adds
                                                                                   into the caller's buffers
any other name                    a codebase's own copy of the op                  Deformable-DETR's
================================  ===============================================  ==============================

Two ways in. ``python -m dnops.compat.multi_scale_deformable_attention install --name NAME`` writes a small module
where ``import NAME`` resolves (inside the installed package for a dotted name; ``uninstall --name NAME`` removes
exactly that file). ``dnops.compat.provide(NAME)`` does the same for this process, before the model code is
imported; for a module global such as Relation-DETR's ``_C`` it assigns the global
(``provide("models.bricks.ms_deform_attn._C")``). Names the interface does not serve resolve to functions that
raise ``NotImplementedError`` naming the op (mmcv checks at import that every op it lists exists); where a compiled
extension is present (an mmcv build whose ``_ext`` lacks the op for a device), those names are its own.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.util
import sys
import sysconfig
import types
from collections.abc import Callable
from pathlib import Path

from dnops.compat import mmcv as _mmcv
from dnops.compat import multi_scale_deformable_attention as _ddetr

DEFORMABLE_DETR = {
    "ms_deform_attn_forward": _ddetr.ms_deform_attn_forward,
    "ms_deform_attn_backward": _ddetr.ms_deform_attn_backward,
}
MMCV = {
    "ms_deform_attn_forward": _mmcv.ms_deform_attn_forward,
    "ms_deform_attn_backward": _mmcv.ms_deform_attn_backward,
}
INTERFACES = {"MultiScaleDeformableAttention": DEFORMABLE_DETR, "mmcv._ext": MMCV}
_NOT_PROVIDED = {"detrex._C": "detrex's DCNv3 (InternImage's deformable convolution) needs detrex's own build"}

_MARK = '"""Written by `python -m dnops.compat.multi_scale_deformable_attention install'


def shim_text(name: str) -> str:
    """The source of the module ``install`` writes for ``name``."""
    return (
        f"{_MARK} --name {name}`: the compiled\n"
        f'extension\'s interface on dnops kernels (`uninstall --name {name}` removes this file)."""\n'
        "from dnops.compat.extensions import fill\n\n"
        "fill(globals())\n"
    )


def fill(namespace: dict, compiled: types.ModuleType | None = None) -> None:
    """Fills a shim module's globals: the interface's functions for its ``__name__``, and a module ``__getattr__``
    giving every other public name ``compiled``'s op (an original build), or else a function that raises
    NotImplementedError naming it."""
    name = namespace["__name__"]
    namespace.update(INTERFACES.get(name, DEFORMABLE_DETR))
    namespace["__getattr__"] = _missing_ops(name, compiled)


def _missing_ops(name: str, compiled: types.ModuleType | None) -> Callable[[str], Callable]:
    def __getattr__(op: str) -> Callable:
        if op.startswith("__"):
            raise AttributeError(f"module {name!r} has no attribute {op!r}")
        if compiled is not None and hasattr(compiled, op):
            return getattr(compiled, op)
        why = _NOT_PROVIDED.get(name, "build the codebase's own extension for it")

        def not_provided(*args, **kwargs):
            raise NotImplementedError(
                f"{name}.{op}: dnops provides {name}'s multi-scale deformable attention "
                f"(ms_deform_attn_forward / ms_deform_attn_backward), not {op}: {why}"
            )

        not_provided.__name__ = op
        return not_provided

    return __getattr__


def extension(name: str, compiled: types.ModuleType | None = None) -> types.ModuleType:
    """A module named ``name`` holding the interface that name's callers use on dnops; ``compiled`` (an original
    build) answers every other name."""
    module = types.ModuleType(name, f"{name} on dnops kernels (dnops.compat.extensions)")
    fill(vars(module), compiled)
    return module


def provide(name: str) -> types.ModuleType:
    """Makes ``import name`` (and ``from package import last``) give dnops' interface in this process; call it before
    the model code is imported. Returns the module provided.

    A name whose parent is an imported module holding a global of that name (Relation-DETR's
    ``models.bricks.ms_deform_attn._C``, None when its JIT build failed) has the global assigned instead. For
    ``mmcv._ext`` the ops of a compiled ``_ext`` that imports stay its own, and an already imported
    ``mmcv.ops.multi_scale_deform_attn`` is pointed at the result."""
    parent, _, last = name.rpartition(".")
    holder = sys.modules.get(parent)
    if holder is not None and last in vars(holder) and not isinstance(vars(holder)[last], types.ModuleType):
        module = extension(name)
        setattr(holder, last, module)
        return module
    current = sys.modules.get(name)
    compiled = current if current is not None and _is_compiled(current) else _load_compiled(name)
    module = extension(name, compiled)
    sys.modules[name] = module
    if holder is not None:
        setattr(holder, last, module)
    ops = sys.modules.get("mmcv.ops.multi_scale_deform_attn")
    if name == "mmcv._ext" and ops is not None:
        ops.ext_module = module
    return module


def _is_compiled(module: types.ModuleType) -> bool:
    return isinstance(getattr(module, "__loader__", None), importlib.machinery.ExtensionFileLoader)


def _load_compiled(name: str) -> types.ModuleType | None:
    """The compiled extension ``import name`` would load, loaded from its file without importing its package (whose
    model code may import the name being provided); None when there is none or it fails to load (the unresolved
    symbols of a build against another torch)."""
    folder = _folder_of(name)
    if folder is None:
        return None
    last = name.rpartition(".")[2]
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = folder / f"{last}{suffix}"
        if path.exists():
            spec = importlib.util.spec_from_file_location(name, path)
            try:
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
            except (ImportError, OSError):
                return None
            return module
    return None


def _folder_of(name: str) -> Path | None:
    """Where ``import name`` looks for it: its parent package's folder (found without importing a top-level parent),
    or site-packages for a top-level name; None when the parent package is not installed."""
    parent = name.rpartition(".")[0]
    if not parent:
        return _site_packages()
    try:
        spec = importlib.util.find_spec(parent)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def install(name: str = "MultiScaleDeformableAttention", target: Path | None = None, force: bool = False) -> Path:
    """Writes the shim module for ``name`` where ``import name`` resolves (``target``: that folder instead); returns
    its path. Refuses to shadow (or be shadowed by) a compiled original unless ``force``; says so when Python would
    not import the shim from ``target``."""
    folder = Path(target) if target is not None else _folder_of(name)
    if folder is None:
        package = name.rpartition(".")[0]
        raise SystemExit(
            f"{package} is not installed here: install the codebase first (pip install -e .), or use --target"
        )
    last = name.rpartition(".")[2]
    others = [p for p in folder.glob(f"{last}.*") if not _is_shim(p) and p.suffix in {".py", ".so", ".pyd"}]
    if target is None:
        try:
            found = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            found = None
        if found is not None and found.origin and not _is_shim(Path(found.origin)):
            others.append(Path(found.origin))
    if others and not force:
        raise SystemExit(
            f"a {name} is already installed at {others[0]}; the shim would shadow it (or be shadowed by it): use "
            "--force to write it anyway"
        )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{last}.py"
    path.write_text(shim_text(name))
    if "." not in name and not _importable_from(folder):
        print(
            f"note: {folder} is not on Python's module path, so `import {name}` will not find the shim there: add "
            "it to PYTHONPATH (or sys.path) before the model is imported",
            file=sys.stderr,
        )
    return path


def _is_shim(path: Path) -> bool:
    """Whether ``path`` is a module this command wrote: replacing one shadows nothing."""
    try:
        return path.suffix == ".py" and path.read_text().startswith(_MARK)
    except (OSError, UnicodeDecodeError):
        return False


def _importable_from(folder: Path) -> bool:
    entries = {Path(p or ".").resolve() for p in sys.path}
    return folder.resolve() in entries


def uninstall(name: str = "MultiScaleDeformableAttention", target: Path | None = None) -> Path | None:
    """Removes the shim ``install`` wrote for ``name`` (nothing else); returns its path, or None if there was none."""
    folder = Path(target) if target is not None else _folder_of(name)
    if folder is None:
        return None
    path = folder / f"{name.rpartition('.')[2]}.py"
    if _is_shim(path):
        path.unlink()
        return path
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["install", "uninstall"])
    parser.add_argument(
        "--name",
        default="MultiScaleDeformableAttention",
        help="the module the codebase imports: groundingdino._C, detrex._C, mmcv._ext, ... (default: %(default)s)",
    )
    parser.add_argument("--target", type=Path, help="folder to write the module to (default: where the import looks)")
    parser.add_argument("--force", action="store_true", help="shadow an installed original")
    args = parser.parse_args(argv)
    if args.action == "install":
        print(f"wrote {install(args.name, args.target, args.force)}")
    else:
        removed = uninstall(args.name, args.target)
        print(f"removed {removed}" if removed else f"no dnops shim for {args.name} found")
    return 0
