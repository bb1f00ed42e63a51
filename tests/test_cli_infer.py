"""run_infer's command line: argument checks, which checkpoint, output names, no overwrite, the user's paths.

Most tests call ``mind_diffusion.cli.infer.main`` in-process on a checkpoint of
``configs/tiny.yaml`` written here from a freshly built network, with the
sampling call replaced by a stub that counts calls (the sampler itself is
tested elsewhere); one test samples for real through ``run_infer.sh``.
"""
import json
import os
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from PIL import Image

from mind_diffusion import paths
from mind_diffusion.cli import infer
from mind_diffusion.cli.factory import build_model
from mind_diffusion.config import config_to_dict, load_config
from mind_diffusion.generate import ImageGenerator
from mind_diffusion.imaging import save_grid
from tests.helpers.infer_main import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_STEPS = 7  # the training step recorded in the test checkpoint


def write_checkpoint(path, overrides=(), step=TINY_STEPS):
    """A checkpoint infer can read: configs/tiny.yaml's network (fresh weights) and its recipe."""
    config = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), list(overrides))
    model, _ = build_model(config.model)
    params = [{"name": f"model.{name}", "data": param} for name, param in model.parameters_and_names()]
    ms.save_checkpoint(params, str(path), append_dict={"step": step, "config": json.dumps(config_to_dict(config))})
    return str(path), config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.ckpt")


@pytest.fixture
def sampling(monkeypatch):
    """Replace the sampling loop by a stub returning a fixed picture; the list records each call's arguments."""
    calls = []

    def fake_sample(self, count, **kwargs):
        self.check_request(count, kwargs["steps"], kwargs["batch_size"])
        calls.append(dict(kwargs, count=count))
        return np.zeros((count,) + self.image_shape, np.float32)

    monkeypatch.setattr(ImageGenerator, "sample", fake_sample)
    return calls


# ---------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["--steps", "0"], "argument --steps: must be at least 2, got 0"),
    (["--steps", "1"], "argument --steps: must be at least 2, got 1"),
    (["--n", "0"], "argument --n: must be at least 1, got 0"),
    (["--n", "-1"], "argument --n: must be at least 1, got -1"),
    (["--batch", "0"], "argument --batch: must be at least 1, got 0"),
    (["--scale", "-1"], "argument --scale: must be at least 0, got -1"),
    (["--scale", "nan"], "argument --scale: must be a finite number"),
    (["--eta", "1.5"], "argument --eta: must be between 0 and 1, got 1.5"),
    (["--seed", "-3"], "argument --seed: must be at least 0, got -3"),
    (["--device-id", "-1"], "argument --device-id: must be at least 0, got -1"),
    (["--label", "-2"], "argument --label: must be at least 0, got -2"),
    (["--n", "two"], "argument --n: 'two' is not an integer"),
    (["--device", "npu"], "is not a device target"),
], ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_bad_values_are_refused_before_anything_runs(args, message, capsys, sampling):
    status, _, err = run_main(["a red circle", *args], capsys)
    assert status == 2 and message in err and "usage: run_infer.sh" in err
    assert not sampling


def test_steps_beyond_the_trained_process_are_refused_before_sampling(tiny, tmp_path, capsys, sampling):
    path, config = tiny
    total = config.diffusion.steps
    status, _, err = run_main(["a red circle", "--ckpt", path, "--steps", str(total + 1), "--out", str(tmp_path)],
                              capsys)
    assert status == 2 and f"--steps: {total + 1} is more than this checkpoint's diffusion.steps" in err
    assert f"give 2..{total}" in err and not sampling and not os.listdir(tmp_path)
    assert run_main(["a red circle", "--ckpt", path, "--steps", str(total), "--out", str(tmp_path)], capsys)[0] == 0
    assert sampling[-1]["steps"] == total


def test_the_options_reach_the_sampler_and_omitted_ones_come_from_the_recipe(tiny, tmp_path, capsys, sampling):
    path, config = tiny
    assert run_main(["a red circle", "--ckpt", path, "--out", str(tmp_path), "--n", "3", "--batch", "2"], capsys)[0] == 0
    recipe = config.sample
    assert {k: sampling[-1][k] for k in ("count", "steps", "sampler", "eta", "guidance_scale", "batch_size")} == \
        {"count": 3, "steps": recipe.steps, "sampler": recipe.sampler, "eta": recipe.eta,
         "guidance_scale": recipe.guidance_scale, "batch_size": 2}
    args = ["a red circle", "--ckpt", path, "--out", str(tmp_path), "--n", "2", "--steps", "3", "--sampler", "ddim",
            "--eta", "0.5", "--scale", "0"]
    assert run_main(args, capsys)[0] == 0
    assert {k: sampling[-1][k] for k in ("count", "steps", "sampler", "eta", "guidance_scale", "batch_size")} == \
        {"count": 2, "steps": 3, "sampler": "ddim", "eta": 0.5, "guidance_scale": 0.0, "batch_size": 2}


def test_the_generator_refuses_what_it_cannot_honour(tiny):
    _, config = tiny
    from mind_diffusion.cli.factory import build_diffusion
    model, tokenizer = build_model(config.model)
    generator = ImageGenerator(model, build_diffusion(config.diffusion, config.model), (3, 16, 16), tokenizer)
    total = config.diffusion.steps
    for count, steps, batch, message in [(0, 2, 1, "number of images"), (1, 1, 1, f"2..{total}"),
                                         (1, total + 1, 1, f"2..{total}"), (1, 2, 0, "batch size")]:
        with pytest.raises(ValueError, match=message):
            generator.sample(count, prompts=["a"], steps=steps, batch_size=batch)


def test_an_unwritable_out_fails_before_sampling(tiny, tmp_path, capsys, sampling):
    path, _ = tiny
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    for out, message in [(str(a_file / "grids"), "is a file, not a folder"),
                         ("/proc/self/grids", "cannot write in /proc/self")]:
        status, _, err = run_main(["a red circle", "--ckpt", path, "--out", out], capsys)
        assert status == 2 and f"--out {out}" in err and message in err
    assert not sampling
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]  # the probe left nothing behind


def test_a_missing_out_folder_is_made_when_the_grid_is_written(tiny, tmp_path, capsys, sampling):
    path, _ = tiny
    out = tmp_path / "new" / "deeper"
    assert infer.check_output_folder(str(out)) == str(out) and not (tmp_path / "new").exists()
    status, stdout, _ = run_main(["a red circle", "--ckpt", path, "--out", str(out), "--n", "1"], capsys)
    assert status == 0 and os.path.dirname(stdout.strip().splitlines()[-1]) == str(out)


@pytest.mark.parametrize("overrides,args,message", [
    (["model.arch=unet", "model.class_cond=true", "model.num_classes=40"], ["--label", "40"],
     "--label 40: this checkpoint has 40 classes, 0..39"),
    (["model.arch=unet"], ["--label", "1"], "--label is for class-conditional checkpoints (or with --classifier); this one is unconditional"),
])
def test_labels_that_do_not_fit_the_checkpoint_are_named(overrides, args, message, tmp_path, capsys, sampling):
    path, _ = write_checkpoint(tmp_path / "unet.ckpt", overrides)
    status, _, err = run_main([*args, "--ckpt", path, "--out", str(tmp_path)], capsys)
    assert status == 2 and message in err and not sampling


def test_device_ids_outside_the_visible_npus_are_refused(tiny, tmp_path, capsys, monkeypatch, sampling):
    path, _ = tiny
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "4,5")
    status, _, err = run_main(["a red circle", "--ckpt", path, "--out", str(tmp_path), "--device", "Ascend",
                               "--device-id", "2"], capsys)
    assert status == 2 and "--device-id 2 is not visible" in err and not sampling


# ---------------------------------------------------------------------------
# Output names: unique, and never over an existing file
# ---------------------------------------------------------------------------

def name_for(prompt, checkpoint, options=(), **changes):
    """The grid name for ``prompt`` with command-line ``options`` and sampling settings ``changes``."""
    args = infer.build_parser().parse_args([prompt, *options])
    settings = dict({"sampler": "ddpm", "steps": 100, "eta": 0.0, "guidance_scale": 3.0, "batch_size": 16}, **changes)
    return infer.grid_name(args, checkpoint, settings)


def test_grid_names_differ_whenever_the_picture_could(tiny, tmp_path):
    path, _ = tiny
    other = tmp_path / "other.ckpt"
    other.write_bytes(open(path, "rb").read())
    base = name_for("a red circle", path)
    assert name_for("a red circle", path) == base  # the same request, the same name
    variants = [name_for(p, path) for p in ("a red circle!", "a red circle.", "A red circle", "a  red circle")]
    emoji = [name_for(p, path) for p in ("🔴", "🟢", "🔴🔴")]
    settings = [name_for("a red circle", path, guidance_scale=5.0), name_for("a red circle", path, steps=50),
                name_for("a red circle", path, sampler="ddim"), name_for("a red circle", path, eta=1.0),
                name_for("a red circle", path, batch_size=4), name_for("a red circle", path, ["--seed", "1"]),
                name_for("a red circle", path, ["--n", "4"]), name_for("a red circle", path, ["--raw"]),
                name_for("a red circle", path, ["--ema-rate", "0.99"]),
                name_for("a red circle", str(other))]
    names = [base, *variants, *emoji, *settings]
    assert len(set(names)) == len(names), names
    assert base.startswith("a_red_circle_s3_ddpm100_seed0_") and base.endswith(".png")
    assert all(name.startswith("samples_") for name in emoji)


def test_a_demo_model_reads_a_free_prompt_in_its_caption_form(tiny, tmp_path, capsys, sampling):
    """A model trained on the demo set gets "a red circle" for "Draw me a RED circle, please!" and the console
    says so; --verbatim gives the words as written; a prompt naming no demo shape and colour goes as written,
    with a note. The grid name keeps the user's words, and the hash the words the model was given."""
    path, _ = tiny  # configs/tiny.yaml: data.kind demo
    base = ["--ckpt", path, "--out", str(tmp_path), "--n", "1"]
    status, stdout, _ = run_main(["Draw me a RED circle, please!", *base], capsys)
    assert status == 0 and sampling[-1]["prompts"] == ["a red circle"]
    assert "prompt read as 'a red circle': the demo model's own caption form (--verbatim" in stdout
    read = os.path.basename(stdout.strip().splitlines()[-1])
    assert read.startswith("Draw_me_a_RED_circle_please_")
    status, stdout, _ = run_main(["Draw me a RED circle, please!", "--verbatim", *base], capsys)
    assert status == 0 and sampling[-1]["prompts"] == ["Draw me a RED circle, please!"]
    assert "read as" not in stdout and os.path.basename(stdout.strip().splitlines()[-1]) != read
    status, stdout, _ = run_main(["请画一个红色的圆，背景是蓝色", *base], capsys)
    assert status == 0 and sampling[-1]["prompts"] == ["蓝色背景上的红色圆形"]
    status, stdout, _ = run_main(["一只猫", *base], capsys)
    assert status == 0 and sampling[-1]["prompts"] == ["一只猫"]
    assert "names no shape with a colour that the demo model knows" in stdout
    status, stdout, _ = run_main(["a red circle", *base], capsys)  # already the caption form: nothing to say
    assert status == 0 and sampling[-1]["prompts"] == ["a red circle"] and "read as" not in stdout


def test_only_a_demo_trained_text_model_has_a_prompt_reader():
    from mind_diffusion.cli.factory import prompt_reader
    from mind_diffusion.data.demo import caption_form
    assert prompt_reader(load_config(os.path.join(ROOT, "configs", "demo.yaml"))) is caption_form
    assert prompt_reader(load_config(os.path.join(ROOT, "configs", "tiny.yaml"))) is caption_form
    for recipe in ("emoji.yaml", "mnist.yaml", "demo_classifier.yaml"):
        assert prompt_reader(load_config(os.path.join(ROOT, "configs", recipe))) is None, recipe


def test_a_long_prompt_gives_a_short_name(tiny):
    path, _ = tiny
    name = name_for("红" * 20000, path)
    assert len(name) < 120 and name.startswith("红" * 40 + "_")


def test_save_grid_never_overwrites_when_asked_not_to(tmp_path):
    first = np.full((1, 4, 4, 3), 10, np.uint8)
    second = np.full((1, 4, 4, 3), 200, np.uint8)
    target = str(tmp_path / "grid.png")
    assert save_grid(first, target, overwrite=False) == target
    assert save_grid(second, target, overwrite=False) == str(tmp_path / "grid-2.png")
    assert save_grid(second, target, overwrite=False) == str(tmp_path / "grid-3.png")
    assert np.asarray(Image.open(target))[3, 3, 0] == 10  # the first grid is untouched
    assert np.asarray(Image.open(tmp_path / "grid-2.png"))[3, 3, 0] == 200
    assert sorted(os.listdir(tmp_path)) == ["grid-2.png", "grid-3.png", "grid.png"]  # no temporary files left
    assert save_grid(second, target) == target and np.asarray(Image.open(target))[3, 3, 0] == 200  # the default


def test_running_the_same_request_twice_keeps_both_grids(tiny, tmp_path, capsys, sampling):
    path, _ = tiny
    args = ["a red circle", "--ckpt", path, "--out", str(tmp_path), "--n", "1"]
    outputs = []
    for _ in range(2):
        status, stdout, _ = run_main(args, capsys)
        assert status == 0
        outputs.append(stdout.strip().splitlines()[-1])
    assert outputs[1] == outputs[0][:-len(".png")] + "-2.png"
    assert all(os.path.exists(p) for p in outputs)


# ---------------------------------------------------------------------------
# Paths are the user's
# ---------------------------------------------------------------------------

def test_relative_paths_are_the_current_directory(tiny, tmp_path, capsys, monkeypatch, sampling):
    path, _ = tiny
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.ckpt").write_bytes(open(path, "rb").read())
    before = set(os.listdir(ROOT))
    status, stdout, _ = run_main(["a red circle", "--ckpt", "mine.ckpt", "--out", "grids", "--n", "1"], capsys)
    assert status == 0
    assert stdout.startswith("checkpoint: mine.ckpt (given with --ckpt)")
    grid = stdout.strip().splitlines()[-1]
    assert os.path.dirname(grid) == str(tmp_path / "grids") and os.path.exists(grid)
    assert set(os.listdir(ROOT)) == before  # nothing written into the repository


def test_a_relative_low_res_image_is_the_current_directorys(tmp_path, capsys, monkeypatch, sampling):
    path, _ = write_checkpoint(tmp_path / "upsampler.ckpt", ["model.arch=glide_upsample", "model.low_res_size=8"])
    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.full((20, 24, 3), (220, 30, 30), np.uint8)).save(tmp_path / "small.png")
    common = ["a red circle", "--ckpt", "upsampler.ckpt", "--n", "1", "--out", "grids"]
    status, _, err = run_main(common + ["--low-res", "missing.png"], capsys)
    assert status == 2 and "--low-res" in err and not sampling
    status, stdout, _ = run_main(common + ["--low-res", "small.png"], capsys)
    assert status == 0 and len(sampling) == 1
    assert os.path.dirname(stdout.strip().splitlines()[-1]) == str(tmp_path / "grids")


def test_a_missing_relative_checkpoint_is_reported_where_the_user_meant_it(tmp_path, capsys, monkeypatch, sampling):
    monkeypatch.chdir(tmp_path)
    status, _, err = run_main(["a red circle", "--ckpt", "nothere.ckpt"], capsys)
    assert status == 2 and f"--ckpt nothere.ckpt: no such file ({tmp_path / 'nothere.ckpt'})" in err


def test_shipped_files_are_found_from_any_directory_and_the_users_own_win(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert paths.input_path("checkpoints/demo.ckpt") == os.path.join(paths.PROJECT_ROOT, "checkpoints", "demo.ckpt")
    assert paths.input_path("configs/tiny.yaml") == os.path.join(paths.PROJECT_ROOT, "configs", "tiny.yaml")
    assert paths.input_path("./configs/tiny.yaml") == os.path.join(paths.PROJECT_ROOT, "configs", "tiny.yaml")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.yaml").write_text("name: mine\n")
    assert paths.input_path("configs/tiny.yaml") == str(tmp_path / "configs" / "tiny.yaml")
    # Only the shipped folders fall back; anything else stays the user's (missing) path.
    assert paths.input_path("README.md") == str(tmp_path / "README.md")
    assert paths.input_path("configs/none.yaml") == str(tmp_path / "configs" / "none.yaml")
    assert paths.output_path("runs/x") == str(tmp_path / "runs" / "x")


# ---------------------------------------------------------------------------
# Which checkpoint without --ckpt
# ---------------------------------------------------------------------------

def touch_run_checkpoint(runs, run, step, mtime):
    path = runs / run / f"ckpt_{step:08d}.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")  # only its name and time are read when choosing
    os.utime(path, (mtime, mtime))
    return str(path)


def test_the_shipped_model_wins_over_shorter_runs(tiny, tmp_path, monkeypatch):
    shipped, _ = tiny  # stands for checkpoints/demo.ckpt: TINY_STEPS training steps
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    choice = infer.choose_checkpoint(shipped=shipped)
    assert choice.path == shipped and "no training checkpoint under ./runs/" in choice.reason
    quick = touch_run_checkpoint(runs, "demo_quick", TINY_STEPS - 1, 2_000_000_000)
    choice = infer.choose_checkpoint(shipped=shipped)
    assert choice.path == shipped
    assert f"runs/demo_quick/ckpt_{TINY_STEPS - 1:08d}.ckpt has only {TINY_STEPS - 1}" in choice.reason
    assert "pass --ckpt runs/demo_quick/" in choice.reason
    longer = touch_run_checkpoint(runs, "full", TINY_STEPS, 1_000_000_000)
    choice = infer.choose_checkpoint(shipped=shipped)
    assert choice.path == longer and f", {TINY_STEPS} >= {TINY_STEPS} steps;" in choice.reason
    newest_long = touch_run_checkpoint(runs, "again", TINY_STEPS + 5, 1_500_000_000)
    assert infer.choose_checkpoint(shipped=shipped).path == newest_long  # the newest long enough, not the newest
    assert quick != newest_long


def test_without_a_shipped_model_the_newest_run_is_used(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = str(tmp_path / "no_demo.ckpt")
    with pytest.raises(FileNotFoundError, match="train one with `bash run_train.sh`, or pass --ckpt PATH"):
        infer.choose_checkpoint(shipped=missing)
    touch_run_checkpoint(tmp_path / "runs", "a", 3, 1_000_000_000)
    newest = touch_run_checkpoint(tmp_path / "runs", "b", 1, 1_100_000_000)
    choice = infer.choose_checkpoint(shipped=missing)
    assert choice.path == newest and "no shipped demo model" in choice.reason


def test_a_run_folder_as_ckpt_means_its_newest_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    touch_run_checkpoint(tmp_path / "runs", "quick", 100, 1_000_000_000)
    last = touch_run_checkpoint(tmp_path / "runs", "quick", 200, 900_000_000)
    choice = infer.choose_checkpoint("runs/quick")
    assert choice.path == last and "run folder runs/quick" in choice.reason
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="the folder holds no ckpt_<step>.ckpt"):
        infer.choose_checkpoint("empty")


def test_the_console_says_which_checkpoint_and_why(tmp_path, capsys, monkeypatch, sampling):
    monkeypatch.chdir(tmp_path)  # no runs/ here: the shipped demo model
    status, stdout, _ = run_main(["a red circle", "--n", "1", "--out", "grids"], capsys)
    assert status == 0
    shipped = os.path.join(paths.PROJECT_ROOT, "checkpoints", "demo.ckpt")
    assert stdout.splitlines()[0] == f"checkpoint: {shipped} (the shipped demo model; no training checkpoint under ./runs/)"


# ---------------------------------------------------------------------------
# Help and long prompts
# ---------------------------------------------------------------------------

def test_help_shows_the_checkpoints_own_defaults(tiny, capsys):
    path, config = tiny
    status, stdout, _ = run_main(["--help", "--ckpt", path], capsys)
    assert status == 0
    text = " ".join(stdout.split())
    assert f"The checkpoint used now: {path} (given with --ckpt)" in text
    assert f"default: {config.sample.guidance_scale})" in text
    assert f"(default: {config.sample.steps}; T = {config.diffusion.steps})" in text
    assert f"default: {config.sample.sampler}" in text and "the checkpoint's sample" not in text


def test_help_without_a_readable_checkpoint_names_the_recipe_keys(tmp_path, capsys):
    broken = tmp_path / "broken.ckpt"
    broken.write_text("not a checkpoint")
    status, stdout, _ = run_main(["--help", "--ckpt", str(broken)], capsys)
    assert status == 0 and "the checkpoint's sample.guidance_scale" in " ".join(stdout.split())


def test_short_warnings_show_each_message_once_and_short(capsys):
    import warnings
    seen = set()
    with infer.short_warnings(seen):
        for _ in range(3):
            warnings.warn("x" * 5000)
    err = capsys.readouterr().err
    assert err.count("warning: ") == 1 and "(5000 characters)" in err and len(err) < 500


def test_a_huge_prompt_is_not_echoed_whole(tiny, tmp_path):
    """Through the launcher and the real sampler (two steps): the console stays short, the grid is written."""
    path, config = tiny
    prompt = "a red circle " * 1600  # 20,800 characters
    env = dict(os.environ, PY=sys.executable, GLOG_v="3")
    # --verbatim: the demo model's reader would give it "a red circle", which fits its text context
    result = subprocess.run(["bash", os.path.join(ROOT, "run_infer.sh"), prompt, "--ckpt", path, "--n", "1",
                             "--steps", "2", "--out", "grids", "--verbatim"], cwd=tmp_path, env=env,
                            capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    console = result.stdout + result.stderr
    assert len(console) < 3000, console[:3000]
    assert f"the prompt is {len(prompt)} characters" in result.stderr
    assert f"text_ctx={config.model.text_ctx}" in result.stderr
    grid = result.stdout.strip().splitlines()[-1]
    assert os.path.dirname(grid) == str(tmp_path / "grids") and os.path.exists(grid)  # the user's cwd


def test_a_model_trained_on_a_respaced_process_samples_on_other_step_counts(tmp_path, capsys):
    """diffusion.timestep_respacing is a training option: sampling respaces the base process (T = 20 here)
    to --steps, where it once crashed with "already respaced" (issue 13)."""
    path, _ = write_checkpoint(tmp_path / "respaced.ckpt", ["diffusion.timestep_respacing='10'", "sample.steps=4"])
    status, out, err = run_main(["a red circle", "--ckpt", path, "--out", str(tmp_path), "--n", "1", "--batch", "1",
                                 "--sampler", "ddim"], capsys)
    assert status == 0, err
    assert "(ddim, 4 steps" in out and os.path.exists(out.strip().splitlines()[-1])


def test_a_classifier_run_is_never_the_default_checkpoint(tiny, tmp_path, monkeypatch):
    """A noisy classifier trained under ./runs/ (configs/demo_classifier.yaml) is for --classifier, not to sample."""
    import shutil
    shipped, _ = tiny
    monkeypatch.chdir(tmp_path)
    classifier = tmp_path / "runs" / "demo_classifier" / f"ckpt_{TINY_STEPS + 100:08d}.ckpt"
    classifier.parent.mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "checkpoints", "demo_classifier.ckpt"), classifier)
    assert infer.checkpoint_arch(str(classifier)) == "classifier" and infer.is_auxiliary_checkpoint(str(classifier))
    assert infer.choose_checkpoint(shipped=shipped).path == shipped


def test_an_autoencoder_run_is_never_sampled(tiny, tmp_path, monkeypatch, capsys):
    """Stage 1 of a latent recipe (configs/ldm_demo_autoencoder.yaml) trains under ./runs/ like a diffusion
    model: it is never the default checkpoint, and --ckpt to it says what to sample instead (it once went
    into the sampler and died in graph compilation, leaving rank_0/ in the user's folder)."""
    shipped, _ = tiny
    monkeypatch.chdir(tmp_path)
    config = load_config(os.path.join(ROOT, "configs", "ldm_demo_autoencoder.yaml"))
    stage1 = tmp_path / "runs" / "ldm_demo_autoencoder" / f"ckpt_{TINY_STEPS + 100:08d}.ckpt"
    stage1.parent.mkdir(parents=True)
    ms.save_checkpoint([{"name": "model.weight", "data": ms.Tensor(np.zeros(1, np.float32))}], str(stage1),
                       append_dict={"step": TINY_STEPS + 100, "config": json.dumps(config_to_dict(config))})
    assert infer.checkpoint_arch(str(stage1)) == "autoencoder" and infer.is_auxiliary_checkpoint(str(stage1))
    assert infer.choose_checkpoint(shipped=shipped).path == shipped
    status, _, err = run_main(["--ckpt", str(stage1), "--n", "1", "--out", str(tmp_path / "grids")], capsys)
    assert status != 0 and "is not a diffusion model to sample (model.arch 'autoencoder'" in err
    assert "ldm_<step>.ckpt" in err and not os.path.exists(tmp_path / "rank_0")
