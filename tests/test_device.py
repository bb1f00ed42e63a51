"""mind_diffusion.device: run device, device id, graph target and the choices that follow it."""
import mindspore as ms
import pytest

from mind_diffusion import device
from mind_diffusion.config import config_from_dict
from mind_diffusion.kernels import aot


@pytest.fixture
def no_ascend_hints(monkeypatch):
    for name in ("ASCEND_RT_VISIBLE_DEVICES", "ASCEND_HOME_PATH", device.GRAPH_TARGET_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(device.glob, "glob", lambda pattern: [])


def test_graph_target_defaults_to_mindspores_and_follows_the_env(monkeypatch):
    monkeypatch.delenv(device.GRAPH_TARGET_ENV, raising=False)
    assert device.graph_target() == ms.get_context("device_target") == "CPU"
    assert device.float64_ok() and device.GRAPH.wide_float == ms.float64
    monkeypatch.setenv(device.GRAPH_TARGET_ENV, "ascend")
    assert device.graph_target() == "Ascend"
    assert not device.float64_ok() and device.GRAPH.wide_float == ms.float32
    monkeypatch.setenv(device.GRAPH_TARGET_ENV, "npu")
    with pytest.raises(ValueError, match=r"MIND_DIFFUSION_GRAPH_TARGET='npu' is not a device target: use one of "
                                         r"CPU, Ascend, GPU"):
        device.graph_target()


def test_building_for_restores_the_previous_target(monkeypatch):
    monkeypatch.setenv(device.GRAPH_TARGET_ENV, "GPU")
    with device.building_for("Ascend"):
        assert device.graph_target() == "Ascend"
    assert device.graph_target() == "GPU"
    monkeypatch.delenv(device.GRAPH_TARGET_ENV)
    with pytest.raises(RuntimeError):
        with device.building_for("Ascend"):
            raise RuntimeError("inside")
    assert device.GRAPH_TARGET_ENV not in device.os.environ


def test_cpp_kernels_are_off_when_building_for_ascend(monkeypatch):
    monkeypatch.delenv("MD_TEST_SWITCH", raising=False)
    monkeypatch.delenv(device.GRAPH_TARGET_ENV, raising=False)
    assert aot.switched_off("MD_TEST_SWITCH", "test kernel") is None
    with device.building_for("Ascend"):
        assert aot.switched_off("MD_TEST_SWITCH", "test kernel") == \
            "graphs built for Ascend (the test kernel is CPU-only)"


def test_pick_device_requested_is_validated(no_ascend_hints):
    assert device.pick_device("ascend") == "Ascend" and device.pick_device("CPU") == "CPU"
    with pytest.raises(ValueError, match=r"--device='TPU' is not a device target"):
        device.pick_device("TPU")


def test_pick_device_auto(no_ascend_hints, monkeypatch):
    assert device.pick_device() == "CPU"
    # NPUs visible but this (CPU-only) MindSpore cannot use them: CPU, and a warning that says why
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "4,5")
    assert not device.mindspore_supports("Ascend")
    with pytest.warns(RuntimeWarning, match="ASCEND_RT_VISIBLE_DEVICES is set, but this MindSpore package "
                                            "cannot use Ascend"):
        assert device.pick_device() == "CPU"
    monkeypatch.setattr(device, "mindspore_supports", lambda target: target == "Ascend")
    assert device.pick_device() == "Ascend"
    monkeypatch.delenv("ASCEND_RT_VISIBLE_DEVICES")
    monkeypatch.setattr(device.glob, "glob", lambda pattern: ["/dev/davinci3"])
    assert device.ascend_hardware_hint() == "/dev/davinci3 exists" and device.pick_device() == "Ascend"


def test_device_id_is_checked_against_visible_devices(no_ascend_hints, monkeypatch):
    assert device.device_id(None) is None and device.device_id(3) == 3
    with pytest.raises(ValueError, match="--device-id must be >= 0"):
        device.device_id(-1)
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "4,5")
    assert device.visible_ascend_devices() == [4, 5] and device.device_id(1) == 1
    with pytest.raises(ValueError, match=r"--device-id 2 is not visible: ASCEND_RT_VISIBLE_DEVICES=4,5 makes "
                                         r"ids 0..1 \(the physical devices \[4, 5\]\) available"):
        device.device_id(2)
    assert device.device_id(2, target="CPU") == 2
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "0,x")
    with pytest.raises(ValueError, match="comma-separated list of device ids"):
        device.visible_ascend_devices()


def test_jit_level_for():
    auto = config_from_dict({})
    assert device.jit_level_for(auto, "Ascend") == "O1" and device.jit_level_for(auto, "CPU") == "O0"
    fixed = config_from_dict({"train": {"jit_level": "O0"}})
    assert device.jit_level_for(fixed, "Ascend") == "O0"


def test_ascend_soc_follows_building_for(monkeypatch):
    monkeypatch.delenv(device.ASCEND_SOC_ENV, raising=False)
    monkeypatch.delenv(device.GRAPH_TARGET_ENV, raising=False)
    assert device.ascend_soc() is None and not device.GRAPH.flash_attention  # CPU
    with device.building_for("Ascend"):
        assert device.ascend_soc() is None  # no NPU here: the chip is unknown, nothing 910B-only is assumed
    with device.building_for("Ascend", soc="910b"):
        assert device.ascend_soc() == "910B" and device.GRAPH.flash_attention
    with device.building_for("Ascend", soc="910A"):
        assert device.ascend_soc() == "910A" and not device.GRAPH.flash_attention
    assert device.ASCEND_SOC_ENV not in device.os.environ
    with pytest.raises(ValueError, match="soc='910B' needs target Ascend"):
        with device.building_for("CPU", soc="910B"):
            pass
    monkeypatch.setenv(device.GRAPH_TARGET_ENV, "Ascend")
    monkeypatch.setenv(device.ASCEND_SOC_ENV, "310P")
    with pytest.raises(ValueError, match="MIND_DIFFUSION_ASCEND_SOC='310P': use one of 910A, 910B"):
        device.ascend_soc()
