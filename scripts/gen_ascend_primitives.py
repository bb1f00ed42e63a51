"""Write tests/data/ascend_primitives.txt: the primitives that MindSpore, as installed, can run on Ascend.

Usage (from the repository root, in the project's environment):

    python scripts/gen_ascend_primitives.py            # writes tests/data/ascend_primitives.txt
    python scripts/gen_ascend_primitives.py --check    # exit 1 if the file differs from a fresh build

The graph audit (tests/test_graph_audit.py) accepts a primitive in a graph built
for Ascend only when it is listed here. The wheel has no single registry of Ascend
kernels that can be read without CANN, so the list is the union of what the
installed package itself declares, each line naming its evidence:

- ``aclnn``: an Ascend kernel class ``mindspore::kernel::pyboost::<Op>Ascend``
  exported by ``lib/plugin/libmindspore_ops_ascend.so`` (read with ``nm -D``):
  the ops MindSpore's op definitions dispatch to CANN's ACLNN kernels;
- ``aicpu``: an ``AiCPURegOp("<Op>")`` registration in ``ops/_op_impl/aicpu/``
  (a kernel on the Ascend chip's AI CPU);
- ``doc``: the primitive's definition (its class in ``mindspore.ops``, or the
  functional API in ``ops/auto_generate/gen_ops_def.py`` that calls it) lists
  ``Ascend`` under "Supported Platforms";
- ``manual``: the few primitives below that the sources above cannot show,
  each with its reason: graph-structure nodes without a kernel, and primitives
  that MindSpore itself emits (backward passes, copies) and runs as CANN
  operators, whose registry is compiled into the CANN-dependent graph_ir
  library. Add to it only with such a reason.
"""
import argparse
import ast
import glob
import inspect
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "tests", "data", "ascend_primitives.txt")

# Primitives the wheel's declarations cannot show, with why each one runs on Ascend.
MANUAL = {
    "Depend": "graph structure: orders side effects, no kernel",
    "Load": "graph structure: reads a Parameter's current value, no kernel",
    "MakeTuple": "graph structure: builds a tuple, no kernel",
    "TupleGetItem": "graph structure: takes a tuple element, no kernel",
    "UpdateState": "graph structure: threads the side-effect state, no kernel",
    "make_list": "graph structure: builds a list, no kernel",
    "Return": "graph structure: a graph's output",
    "Conv2DBackpropInput": "backward of Conv2D (documented for Ascend), the GE operator of the same name",
    "Conv2DBackpropFilter": "backward of Conv2D (documented for Ascend), the GE operator of the same name",
    "LayerNormGrad": "backward of LayerNorm (documented for Ascend), the GE operator LayerNormGrad",
    "SplitWithSize": "emitted by MindSpore's own backward of Concat; CANN's aclnnSplitWithSize (Atlas training, A2)",
    "TensorMove": "inserted by MindSpore's graph compiler to copy a Parameter's value; CANN operator TensorMove",
}

PYBOOST_CLASS = re.compile(r"\bmindspore::kernel::pyboost::([A-Za-z0-9_]+)Ascend\b")
AICPU_REG = re.compile(r"AiCPURegOp\(\s*[\"']([A-Za-z0-9_]+)[\"']\s*\)")
PLATFORMS = re.compile(r"Supported Platforms:\s*\n\s*(.*)")


def mindspore_dir():
    import mindspore
    return os.path.dirname(os.path.abspath(mindspore.__file__))


def aclnn_ops(ms_dir):
    """Ops with an exported ``pyboost::<Op>Ascend`` kernel class in the Ascend ops plugin."""
    library = os.path.join(ms_dir, "lib", "plugin", "libmindspore_ops_ascend.so")
    if not os.path.isfile(library):
        sys.exit(f"{library} not found: this MindSpore package has no Ascend ops plugin")
    nm = shutil.which("nm")
    if nm is None:
        sys.exit("nm (GNU binutils) is needed to read the Ascend plugin's symbols: apt-get install binutils")
    symbols = subprocess.run([nm, "-D", "-C", "--defined-only", library], check=True,
                             stdout=subprocess.PIPE, text=True).stdout
    return set(PYBOOST_CLASS.findall(symbols))


def aicpu_ops(ms_dir):
    names = set()
    for path in glob.glob(os.path.join(ms_dir, "ops", "_op_impl", "aicpu", "*.py")):
        with open(path, encoding="utf-8") as f:
            names.update(AICPU_REG.findall(f.read()))
    return names


def _says_ascend(doc):
    match = PLATFORMS.search(doc or "")
    return bool(match) and "Ascend" in match.group(1)


def documented_ops():
    """Primitives whose class, or the functional API calling them, lists Ascend under Supported Platforms."""
    from mindspore.ops.primitive import Primitive
    import mindspore.ops.auto_generate.gen_ops_def as functional
    import mindspore.ops.auto_generate.gen_ops_prim as generated
    import mindspore.ops.operations as operations

    names = set()
    for module in (generated, operations):
        for cls in vars(module).values():
            if inspect.isclass(cls) and issubclass(cls, Primitive) and _says_ascend(cls.__doc__):
                names.add(cls.__name__)
    # gen_ops_def: `def add(...): """...Supported Platforms: ``Ascend``...""" return add_op(...)`
    # with module-level primitive instances such as `add_op = Add()`.
    instances = {name: value.name for module in (generated, functional)
                 for name, value in vars(module).items() if isinstance(value, Primitive)}
    for node in ast.parse(inspect.getsource(functional)).body:
        if isinstance(node, ast.FunctionDef) and _says_ascend(ast.get_docstring(node)):
            for call in ast.walk(node):
                if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in instances:
                    names.add(instances[call.func.id])
    return names


def build():
    import mindspore
    ms_dir = mindspore_dir()
    sources = {"aclnn": aclnn_ops(ms_dir), "aicpu": aicpu_ops(ms_dir), "doc": documented_ops(),
               "manual": set(MANUAL)}
    names = sorted(set().union(*sources.values()))
    lines = [
        f"# Primitives with an Ascend kernel in MindSpore {mindspore.__version__}, as installed.",
        "# Generated by scripts/gen_ascend_primitives.py (its docstring explains each source);",
        "# regenerate with:  python scripts/gen_ascend_primitives.py",
        "# Read from <site-packages>/mindspore/:",
        "#   aclnn:  lib/plugin/libmindspore_ops_ascend.so, classes mindspore::kernel::pyboost::<Op>Ascend (nm -D)",
        "#   aicpu:  ops/_op_impl/aicpu/*.py, AiCPURegOp(\"<Op>\")",
        "#   doc:    mindspore.ops primitive classes and ops/auto_generate/gen_ops_def.py functions whose",
        "#           docstring lists Ascend under \"Supported Platforms\"",
        "#   manual: listed in the script with a reason: " + "; ".join(f"{k} ({v})" for k, v in MANUAL.items()),
        f"# {len(names)} primitives. Format: <primitive> <sources>",
    ]
    for name in names:
        lines.append(f"{name} {','.join(s for s in sources if name in sources[s])}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="where to write the list (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    args = parser.parse_args(argv)
    text = build()
    if args.check:
        with open(args.out, encoding="utf-8") as f:
            same = f.read() == text
        print(f"{args.out}: {'up to date' if same else 'differs from a fresh build: regenerate it'}")
        return 0 if same else 1
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    count = sum(1 for line in text.splitlines() if not line.startswith("#"))
    print(f"{args.out}: {count} primitives")
    return 0


if __name__ == "__main__":
    sys.exit(main())
