"""Which backend the graphs run on, and which backend they are built for.

Two notions, shared by every entry point and every layer that picks a code path:

- the *run device* (:func:`pick_device`, :func:`device_id`): where MindSpore
  executes, chosen once by a CLI before any Cell is built;
- the *graph target* (:func:`graph_target`): the backend whose kernels a graph
  being built must stick to. It is MindSpore's ``device_target`` unless
  ``MIND_DIFFUSION_GRAPH_TARGET`` says otherwise, which lets the CPU build
  graphs exactly as they would be built for Ascend (no C++ CPU operators, no
  float64, FlashAttention where it applies) and inspect them — the graph audit
  test does this through :func:`building_for`.

Every choice that depends on the target is made in Python while a graph is
built (Cell construction, or attribute lookups that the graph parser resolves,
see :data:`GRAPH`), never on tensor values at run time.
"""
import contextlib
import glob
import os
import warnings

TARGETS = ("CPU", "Ascend", "GPU")
GRAPH_TARGET_ENV = "MIND_DIFFUSION_GRAPH_TARGET"
# Ascend chip generations that change which kernels exist: 910A (Atlas training series)
# and 910B (Atlas A2 and later, which add FlashAttention and bfloat16).
ASCEND_SOCS = ("910A", "910B")
ASCEND_SOC_ENV = "MIND_DIFFUSION_ASCEND_SOC"
# FlashAttentionScore's head size: a multiple of 16, at most 512 (MindSpore 2.10 docs).
FLASH_HEAD_MULTIPLE, FLASH_HEAD_MAX = 16, 512
JIT_LEVELS = ("O0", "O1", "auto")


def canonical_target(name, source):
    """``name`` spelled as MindSpore spells it (CPU, Ascend, GPU), any case accepted.

    :param source: where the value came from, for the error message (e.g. "--device").
    :raises ValueError: naming the source and the allowed values.
    """
    for target in TARGETS:
        if str(name).strip().lower() == target.lower():
            return target
    raise ValueError(f"{source}={name!r} is not a device target: use one of {', '.join(TARGETS)}")


def graph_target():
    """The backend the graphs built now are meant for: ``$MIND_DIFFUSION_GRAPH_TARGET`` or MindSpore's device target."""
    value = os.environ.get(GRAPH_TARGET_ENV, "").strip()
    if value:
        return canonical_target(value, GRAPH_TARGET_ENV)
    import mindspore as ms  # deferred: pick_device must work before MindSpore is configured
    return ms.get_context("device_target")


def ascend_soc():
    """The Ascend generation graphs are built for: "910A", "910B", or None (not Ascend, or unknown).

    ``$MIND_DIFFUSION_ASCEND_SOC`` decides when set (so a CPU machine can build as for a
    910B); otherwise MindSpore's own SoC feature table, which knows only on an NPU.
    """
    if graph_target() != "Ascend":
        return None
    value = os.environ.get(ASCEND_SOC_ENV, "").strip()
    if value:
        if value.upper() not in ASCEND_SOCS:
            raise ValueError(f"{ASCEND_SOC_ENV}={value!r}: use one of {', '.join(ASCEND_SOCS)}")
        return value.upper()
    try:
        from mindspore._c_expression import MSContext
        context = MSContext.get_instance()
        if context.ascend_soc_supports_feature("train_hq_dtype_line"):  # MindSpore's test for 910B-class chips
            return "910B"
        if context.ascend_soc_supports_feature("amp_loss_scale_train_classic_target"):  # and for 910A
            return "910A"
    except Exception:  # noqa: BLE001 - a build without the Ascend plugin cannot tell
        pass
    return None


def float64_ok():
    """Whether a graph built now may use float64: only on CPU (Ascend has no float64 kernel for most ops)."""
    return graph_target() == "CPU"


@contextlib.contextmanager
def building_for(target, soc=None):
    """Build graphs inside this block as for ``target`` (e.g. "Ascend" on a CPU machine), then restore.

    :param soc: for Ascend, the chip generation ("910A" or "910B"); None leaves it to
        MindSpore (unknown off an NPU, so 910B-only kernels such as FlashAttention are not used).

    Only the build target changes; the graphs still run (if run) on the real device.
    Both the Cells and their compilation must happen inside the block: some choices
    are made when a Cell is constructed, others when its graph is parsed.
    """
    target = canonical_target(target, "building_for")
    if soc is not None and (target != "Ascend" or str(soc).upper() not in ASCEND_SOCS):
        raise ValueError(f"building_for: soc={soc!r} needs target Ascend and one of {', '.join(ASCEND_SOCS)}")
    saved = {name: os.environ.get(name) for name in (GRAPH_TARGET_ENV, ASCEND_SOC_ENV)}
    os.environ[GRAPH_TARGET_ENV] = target
    os.environ.pop(ASCEND_SOC_ENV, None)
    if soc is not None:
        os.environ[ASCEND_SOC_ENV] = str(soc).upper()
    try:
        yield target
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class _GraphChoices:
    """Target-dependent constants for code inside ``construct``: ``GRAPH.wide_float``, ``GRAPH.flash_attention``.

    MindSpore's graph parser resolves attributes of Python objects in Python when it
    builds a graph, so each property below is a constant of the graph being built
    (read once per build, not per call) and follows :func:`building_for`.
    """

    @property
    def target(self):
        return graph_target()

    @property
    def wide_float(self):
        """The dtype for precision-critical transcendentals: float64 on CPU, float32 elsewhere."""
        import mindspore as ms
        return ms.float64 if float64_ok() else ms.float32

    @property
    def flash_attention(self):
        """Whether ``ops.flash_attention_score`` exists where the graph will run: Ascend 910B-class chips."""
        return ascend_soc() == "910B"


GRAPH = _GraphChoices()


# ---------------------------------------------------------------------------
# The run device.
# ---------------------------------------------------------------------------

def visible_ascend_devices():
    """The device ids this process may use per ``ASCEND_RT_VISIBLE_DEVICES`` ("0,1,4"), or None when unset."""
    value = os.environ.get("ASCEND_RT_VISIBLE_DEVICES", "").strip()
    if not value:
        return None
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"ASCEND_RT_VISIBLE_DEVICES={value!r} must be a comma-separated list of device "
                         "ids, e.g. 0,1,2,3") from None


def ascend_hardware_hint():
    """Why this machine looks like it has Ascend NPUs (a /dev/davinciN node, visible devices, CANN), or None."""
    nodes = sorted(glob.glob("/dev/davinci[0-9]*"))
    if nodes:
        return f"{nodes[0]} exists"
    if visible_ascend_devices():
        return "ASCEND_RT_VISIBLE_DEVICES is set"
    if os.environ.get("ASCEND_HOME_PATH"):
        return "ASCEND_HOME_PATH is set"
    return None


def mindspore_supports(target):
    """Whether the installed MindSpore package can run on ``target`` (its plugin loaded); never raises."""
    try:
        from mindspore._c_expression import MSContext  # the check behind ms.device_context.*.is_available
        return bool(MSContext.get_instance().is_pkg_support_device(target))
    except Exception:  # noqa: BLE001 - any failure to ask means "cannot use it"
        return False


def pick_device(requested=None):
    """The MindSpore device target for a run.

    The requested backend (validated, any case), else Ascend when this machine looks
    like it has NPUs *and* this MindSpore build can drive them, else CPU. A machine
    with NPUs but a CPU-only (or mismatched) MindSpore gets CPU with a warning that says so.
    """
    if requested:
        return canonical_target(requested, "--device")
    hint = ascend_hardware_hint()
    if hint is None:
        return "CPU"
    if mindspore_supports("Ascend"):
        return "Ascend"
    warnings.warn(f"mind_diffusion: {hint}, but this MindSpore package cannot use Ascend (a CPU-only build, or "
                  "one that does not match the installed CANN); running on CPU. Install the MindSpore wheel "
                  "for your CANN version, or pass --device CPU to silence this.", RuntimeWarning, stacklevel=2)
    return "CPU"


def device_id(requested=None, target="Ascend"):
    """The device id to pass to ``ms.set_device``: ``requested`` (checked), else None (MindSpore's default).

    None lets MindSpore choose: 0 for a single process, the local rank under msrun.
    With ``ASCEND_RT_VISIBLE_DEVICES`` set, ids are positions in that list (the
    runtime renumbers the visible devices from 0), so ``requested`` must be below its length.

    :raises ValueError: for a negative id or one outside the visible devices.
    """
    if requested is None:
        return None
    requested = int(requested)
    if requested < 0:
        raise ValueError(f"--device-id must be >= 0, got {requested}")
    visible = visible_ascend_devices() if target == "Ascend" else None
    if visible is not None and requested >= len(visible):
        raise ValueError(f"--device-id {requested} is not visible: ASCEND_RT_VISIBLE_DEVICES="
                         f"{os.environ['ASCEND_RT_VISIBLE_DEVICES']} makes ids 0..{len(visible) - 1} "
                         f"(the physical devices {visible}) available")
    return requested


def jit_level_for(config, target):
    """MindSpore's ``jit_config`` level for a run: ``config.train.jit_level`` on ``target``.

    "auto" means O1 (graph-kernel fusion) on Ascend and O0 elsewhere; "O0" and "O1"
    are taken as they are. Apply it with ``ms.set_context(jit_config={"jit_level": level})``
    before any graph is built.
    """
    level = config.train.jit_level
    if level not in JIT_LEVELS:
        raise ValueError(f"train.jit_level must be one of {', '.join(JIT_LEVELS)}, got {level!r}")
    if level != "auto":
        return level
    return "O1" if canonical_target(target, "device target") == "Ascend" else "O0"
