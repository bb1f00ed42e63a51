"""What runs differently on Ascend, emulated on CPU: overflow detection in saturation mode (910A, and
910B with MS_ASCEND_CHECK_OVERFLOW_MODE=SATURATION_MODE), and the host interactions of the training
loop, fed from the host (CPU) or through a device data sink (Ascend)."""
import os
import sys

import numpy as np
import pytest
import mindspore as ms
from mindspore import Parameter, nn, ops

from mind_diffusion.train import trainer as trainer_module
from mind_diffusion.train.step import STATUS_REGISTER, VALUES, OverflowCheck, TrainStep
from test_train_step import Toy, batch, make_step

FLOAT32_MAX = float(np.finfo(np.float32).max)


class EmulatedNPU(nn.Cell):
    """A float-status register and the saturation of an NPU: inf → ±max, NaN → 0 in the values, while
    the register records that something overflowed. ``clear`` and ``get`` stand for
    NPUClearFloatStatusV2 / NPUGetFloatStatusV2."""

    def __init__(self):
        super().__init__()
        self.register = Parameter(ms.Tensor(np.zeros(8, np.int32)), name="float_status", requires_grad=False)

    def saturate(self, x):
        overflowed = ops.logical_not(ops.isfinite(x)).any().astype(ms.int32)
        ops.assign(self.register, ops.maximum(self.register, overflowed))
        return ops.clip_by_value(ops.select(ops.isnan(x), ops.zeros_like(x), x), -FLOAT32_MAX, FLOAT32_MAX)


class _Clear(nn.Cell):
    def __init__(self, npu):
        super().__init__()
        self.npu = npu

    def construct(self, status):
        ops.assign(self.npu.register, ops.zeros_like(self.npu.register))
        return status


class _Get(nn.Cell):
    def __init__(self, npu):
        super().__init__()
        self.npu = npu

    def construct(self, status):
        return self.npu.register * 1


class SaturatingStep(TrainStep):
    """The train step as a saturating NPU runs it: the loss and gradients the check sees are saturated."""

    def __init__(self, step, npu, mode):
        super().__init__(step.loss_net, step.optimizer, step.ema, loss_scale=float(step.loss_scale.asnumpy()),
                         overflow=OverflowCheck(mode, status_ops=(_Clear(npu), _Get(npu))))
        self.npu = npu

    def device_view(self, loss, grads):
        return self.npu.saturate(loss), tuple(self.npu.saturate(g) for g in grads)


@pytest.mark.parametrize("mode", [STATUS_REGISTER, VALUES])
def test_saturation_mode_overflow_is_seen_only_through_the_status_register(mode):
    """A NaN step on a saturating NPU: its values look finite (inf → max, NaN → 0). The register path
    (what 910A uses) skips it and halves the loss scale; a value check would take it for a clean step."""
    model = Toy(poison=True)
    plain, _ = make_step(model, loss_scale=1024.0)
    step = SaturatingStep(plain, EmulatedNPU(), mode)
    before = model.w.asnumpy().copy()
    *_, finite = step(*batch())
    if mode == STATUS_REGISTER:
        assert not bool(finite.asnumpy())
        np.testing.assert_array_equal(model.w.asnumpy(), before)
        assert float(step.loss_scale.asnumpy()) == 512.0
        assert int(step.optimizer.global_step.asnumpy()) == 0
    else:  # why the values cannot be trusted there: the overflow goes unnoticed
        assert bool(finite.asnumpy())  # NaN gradients arrive as zeros and are applied as a step
        assert int(step.optimizer.global_step.asnumpy()) == 1
        assert float(step.loss_scale.asnumpy()) == 1024.0


def test_status_register_is_cleared_before_each_step():
    """After an overflowed step, a clean step is applied: the register was cleared before its forward pass."""
    npu = EmulatedNPU()
    model = Toy()
    plain, _ = make_step(model, loss_scale=1024.0)
    step = SaturatingStep(plain, npu, STATUS_REGISTER)
    npu.register.set_data(ms.Tensor(np.ones(8, np.int32)))  # left over from an earlier overflow
    *_, finite = step(*batch())
    assert bool(finite.asnumpy()) and int(step.optimizer.global_step.asnumpy()) == 1


class Counter:
    """Counts device → host reads (asnumpy) and host → device copies (Tensors made from arrays) while on."""

    def __init__(self, monkeypatch):
        self.on, self.reads, self.uploads = False, 0, 0
        original_read = ms.Tensor.asnumpy
        counter = self

        def asnumpy(tensor):
            # reads by the project's code; MindSpore's own (its compiler reads parameters once) are not the loop's
            counter.reads += counter.on and "mindspore" not in sys._getframe(1).f_code.co_filename.split(os.sep)
            return original_read(tensor)
        monkeypatch.setattr(ms.Tensor, "asnumpy", asnumpy)
        monkeypatch.setattr(ms.Parameter, "asnumpy", asnumpy, raising=False)

        class CountingMS:
            def __getattr__(self, name):
                return getattr(ms, name)

            @staticmethod
            def Tensor(*args, **kwargs):
                counter.uploads += counter.on
                return ms.Tensor(*args, **kwargs)
        monkeypatch.setattr(trainer_module, "ms", CountingMS())


def tiny_trainer(tmp_path, steps, log_every, monkeypatch, counter):
    from mind_diffusion.cli.factory import build_diffusion, build_model
    from mind_diffusion.config import load_config
    config = load_config("configs/tiny.yaml", [f"train.total_steps={steps}", f"train.log_every={log_every}",
                                               "train.save_every=1000", "train.sample_every=0"])
    model, tokenizer = build_model(config.model)
    trainer = trainer_module.Trainer(config, model, build_diffusion(config.diffusion, config.model),
                                     str(tmp_path / "run"), tokenizer=tokenizer)
    start, save = trainer.start, trainer.writer.save

    def counted_start(*a, **k):
        step = start(*a, **k)
        counter.on = True
        return step

    def uncounted_save(*a, **k):  # the checkpoint snapshot at the end is not part of the loop
        counter.on = False
        return save(*a, **k)
    monkeypatch.setattr(trainer, "start", counted_start)
    monkeypatch.setattr(trainer.writer, "save", uncounted_save)
    return trainer


def test_host_fed_loop_syncs_once_per_log_interval(tmp_path, monkeypatch):
    counter = Counter(monkeypatch)
    trainer = tiny_trainer(tmp_path, 6, 3, monkeypatch, counter)
    trainer.fit(progress=False)
    columns = len(trainer.step_columns)  # images, u, noise, tokens, mask: one copy each per step
    assert counter.reads == 2  # one metrics read per interval of 3 steps
    assert counter.uploads == 6 * columns + 1 + 2  # + the metrics reset at the start and per interval


def test_sink_loop_runs_log_every_steps_per_call_with_one_sync(tmp_path, monkeypatch):
    """The Ascend path, with ms.data_sink emulated: the device runs the steps from the dataset itself."""
    calls = []

    def emulated_data_sink(fn, dataset, sink_size=1, **_):
        rows = dataset.create_tuple_iterator(num_epochs=1)

        def run():
            calls.append(sink_size)
            for _ in range(sink_size):
                out = fn(*next(rows))
            return out
        return run
    monkeypatch.setattr(ms, "data_sink", emulated_data_sink)
    counter = Counter(monkeypatch)
    trainer = tiny_trainer(tmp_path, 6, 3, monkeypatch, counter)
    trainer.target = "Ascend"  # the loop's choice only; the graphs stay CPU graphs
    trainer.fit(progress=False)
    assert calls == [3, 3]
    assert counter.reads == 2 and counter.uploads == 1 + 2  # the metrics reset at the start, read and reset per interval
    records = [__import__("json").loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [3, 6] and all(r["steps"] == 3 for r in records)
