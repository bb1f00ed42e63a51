"""Config loading: defaults, recipes, clear errors, overrides, save/load round trip."""
import glob
import os

import pytest

from mind_diffusion.config import (Config, ConfigError, config_from_dict, config_to_dict,
                                   describe_fields, load_config, save_config, uses_loss_scale)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def error_of(raw=None, overrides=()):
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw or {}, overrides)
    return str(info.value)


def test_empty_recipe_gives_documented_defaults():
    config = config_from_dict({})
    assert config.model.arch == "unet" and config.diffusion.steps == 1000
    assert config.train.ema_rate == [0.9999] and config.sample.sampler == "ddpm"
    # mirrors take their source's value; "" channel_mult resolves to ADM's table for 32
    assert config.data.image_size == config.model.image_size == 32
    assert config.train.seed == config.seed == 0
    assert config.diffusion.learn_sigma is False
    assert config.model.channel_mult == [1, 2, 2, 2]
    for key, (_, doc) in describe_fields().items():
        assert doc.strip(), f"{key} has no doc"


def test_recipe_list_is_complete():
    names = {os.path.basename(p) for p in RECIPES}
    assert {"tiny.yaml", "demo.yaml", "ddpm_cifar10.yaml", "iddpm_cifar10.yaml",
            "adm_imagenet64.yaml", "glide_base64.yaml", "glide_upsample256.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_every_recipe_loads_and_round_trips(path, tmp_path):
    config = load_config(path)
    saved = tmp_path / "resolved.yaml"
    save_config(config, str(saved))
    assert load_config(str(saved)) == config
    assert config_to_dict(load_config(str(saved))) == config_to_dict(config)


def test_recipes_carry_the_papers_numbers():
    ddpm = load_config(os.path.join(ROOT, "configs", "ddpm_cifar10.yaml"))
    assert (ddpm.diffusion.noise_schedule, ddpm.diffusion.steps, ddpm.diffusion.loss) == ("linear", 1000, "mse")
    assert (ddpm.model.num_channels, ddpm.model.channel_mult, ddpm.model.attention_resolutions) == (128, [1, 2, 2, 2], [16])
    assert (ddpm.train.lr, ddpm.train.batch_size, ddpm.model.dropout) == (2e-4, 128, 0.1)
    iddpm = load_config(os.path.join(ROOT, "configs", "iddpm_cifar10.yaml"))
    assert (iddpm.diffusion.noise_schedule, iddpm.diffusion.steps, iddpm.diffusion.learn_sigma) == ("cosine", 4000, True)
    assert (iddpm.model.num_res_blocks, iddpm.model.dropout, iddpm.train.lr) == (3, 0.3, 1e-4)
    tiny = load_config(os.path.join(ROOT, "configs", "tiny.yaml"))
    assert tiny.model.arch == "glide" and tiny.model.image_size <= 16 and tiny.train.batch_size == 4
    upsample = load_config(os.path.join(ROOT, "configs", "glide_upsample256.yaml"))
    assert (upsample.model.image_size, upsample.model.low_res_size) == (256, 64)
    # ADM and GLIDE train with ADM's float16 torso (use_fp16 True in their scripts)
    assert [load_config(os.path.join(ROOT, "configs", f"{name}.yaml")).model.dtype
            for name in ("adm_imagenet64", "glide_base64", "glide_upsample256", "ddpm_cifar10")] \
        == ["fp16", "fp16", "fp16", "fp32"]


def test_unknown_key_is_named_with_a_suggestion():
    message = error_of({"train": {"lrr": 1e-4}})
    assert "'train.lrr'" in message and "'train.lr'" in message
    assert "unknown key 'optimizer'" in error_of({"optimizer": {}})
    assert "diffusion.steps" in error_of({"diffusion": {"diffusion_steps": 10}})


def test_bad_values_name_the_key_and_what_is_allowed():
    message = error_of({"model": {"arch": "transformer"}})
    assert "model.arch" in message and "'unet'" in message and "'glide'" in message
    assert "train.lr: must be > 0" in error_of({"train": {"lr": -1}})
    assert "data.caption_dropout: must lie in [0.0, 1.0]" in error_of({"data": {"caption_dropout": 1.5}})
    assert "train.batch_size: must be an integer" in error_of({"train": {"batch_size": True}})
    assert "model.use_fp16: must be true or false" in error_of({"model": {"use_fp16": 1}})
    assert "diffusion.loss" in error_of({"diffusion": {"loss": "hybrid"}})


def test_cross_field_errors():
    assert "model.attention_resolutions" in error_of({"model": {"attention_resolutions": [12]}})
    assert "diffusion.timestep_respacing" in error_of(
        {"diffusion": {"steps": 10, "noise_schedule": "cosine", "timestep_respacing": "50"}})
    message = error_of({"model": {"learn_sigma": False}, "diffusion": {"learn_sigma": True}})
    assert "diffusion.learn_sigma" in message and "model.learn_sigma" in message
    assert "data.path" in error_of({"data": {"kind": "folder"}})
    assert "model.num_classes" in error_of({"model": {"class_cond": True}})
    assert ">= 40" in error_of({"model": {"class_cond": True, "num_classes": 10}})
    assert "model.channel_mult" in error_of({"model": {"image_size": 48}})
    assert "sample.steps" in error_of({"diffusion": {"steps": 10, "noise_schedule": "cosine"}})
    message = error_of({"diffusion": {"predict_xstart": True, "predict_v": True}})
    assert "diffusion.predict_v" in message and "diffusion.predict_xstart" in message
    message = error_of({"diffusion": {"high_noise_share": 0.25, "schedule_sampler": "loss-second-moment"}})
    assert "diffusion.high_noise_share" in message and "schedule_sampler" in message
    assert "diffusion.high_noise_share" in error_of({"diffusion": {"high_noise_share": 1.0}})
    assert "diffusion.high_noise_steps" in error_of({"diffusion": {"high_noise_steps": 0}})


def test_overrides_parse_as_yaml_and_validate_like_file_values():
    config = config_from_dict({}, ["train.lr=1e-4", "model.attention_resolutions=16,8",
                                   "data.random_flip=false", "seed=7", "train.ema_rate=[0.99, 0.999]",
                                   "name=演示"])
    assert config.train.lr == 1e-4 and isinstance(config.train.lr, float)
    assert config.model.attention_resolutions == [16, 8]
    assert config.data.random_flip is False
    assert config.seed == 7 and config.train.seed == 7
    assert config.train.ema_rate == [0.99, 0.999] and config.name == "演示"
    assert "sample.sampler" in error_of(overrides=["sample.sampler=heun"])
    assert "key=value" in error_of(overrides=["train.lr"])
    assert "'train.lrr'" in error_of(overrides=["train.lrr=1"])


def test_load_config_reports_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  arch: vae\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.yaml: model\.arch"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_save_load_round_trip_with_overrides(tmp_path):
    config = load_config(os.path.join(ROOT, "configs", "demo.yaml"),
                         ["train.lr=2.5e-4", "name=中文运行", "sample.guidance_scale=5"])
    path = tmp_path / "run" / "config.yaml"
    save_config(config, str(path))
    again = load_config(str(path))
    assert again == config and isinstance(again, Config)
    assert "中文运行" in path.read_text(encoding="utf-8")


def test_linear_schedule_with_too_few_steps_is_a_config_error():
    """β_T = 0.02·1000/T must stay below 1: T <= 20 is refused at load time, naming the key."""
    message = error_of({"diffusion": {"steps": 20}, "sample": {"steps": 10}})
    assert message.startswith("diffusion.steps:") and "'linear'" in message and "got 20" in message
    assert config_from_dict({"diffusion": {"steps": 21}, "sample": {"steps": 10}}).diffusion.steps == 21
    cosine = config_from_dict({"diffusion": {"steps": 20, "noise_schedule": "cosine"}, "sample": {"steps": 10}})
    assert cosine.diffusion.steps == 20


def test_model_dtype_and_the_loss_scale_it_implies():
    assert config_from_dict({}).model.dtype == "fp32"
    assert [uses_loss_scale(config_from_dict({"model": {"dtype": d}})) for d in ("fp32", "fp16", "bf16")] \
        == [False, True, False]
    message = error_of({"model": {"dtype": "float16"}})
    assert message.startswith("model.dtype: must be one of: 'fp32', 'fp16', 'bf16'")


def test_use_fp16_is_read_as_model_dtype():
    """guided-diffusion's flag (and resolved configs saved before model.dtype) still load."""
    assert config_from_dict({"model": {"use_fp16": True}}).model.dtype == "fp16"
    assert config_from_dict({"model": {"use_fp16": False}}).model.dtype == "fp32"
    assert config_from_dict({"model": {"use_fp16": False, "dtype": "bf16"}}).model.dtype == "bf16"
    old_saved = {"model": {"use_fp16": True}, "train": {"use_fp16": None}}
    assert config_from_dict(old_saved).model.dtype == "fp16"
    assert config_from_dict({}, ["model.use_fp16=true"]).model.dtype == "fp16"
    for raw in ({"model": {"use_fp16": True, "dtype": "bf16"}}, {"model": {"use_fp16": False, "dtype": "fp16"}},
                {"train": {"use_fp16": True}, "model": {"dtype": "fp32"}}):
        message = error_of(raw)
        assert "use_fp16" in message and "model.dtype" in message
    assert "use_fp16" not in config_to_dict(config_from_dict({"model": {"use_fp16": True}}))["model"]


def test_checkpoint_retention_and_jit_level_keys():
    train = config_from_dict({}).train
    assert (train.keep_checkpoints, train.jit_level) == (0, "auto")
    assert "train.keep_checkpoints: must be >= 0" in error_of({"train": {"keep_checkpoints": -1}})
    assert "train.jit_level: must be one of: 'O0', 'O1', 'auto'" in error_of({"train": {"jit_level": "O2"}})
    assert config_from_dict({}, ["train.jit_level=O1", "train.keep_checkpoints=3"]).train.keep_checkpoints == 3


def test_sampling_values_outside_their_range_are_named():
    from mind_diffusion.config import ConfigError, config_from_dict
    with pytest.raises(ConfigError, match="sample.steps"):
        config_from_dict({"sample": {"steps": 1}})
    with pytest.raises(ConfigError, match="sample.eta"):
        config_from_dict({"sample": {"eta": 1.5}})
    with pytest.raises(ConfigError, match="model.in_channels.*demo"):
        config_from_dict({"model": {"in_channels": 1}, "data": {"kind": "demo"}})


def test_recipe_input_paths_are_the_users_with_shipped_files_as_fallback(tmp_path, monkeypatch):
    """demo.yaml's train.init_from (checkpoints/demo_eps.ckpt) is found from any directory; a relative
    data.path means the current directory; both are recorded absolute."""
    from mind_diffusion.config import load_config
    from mind_diffusion.paths import PROJECT_ROOT
    monkeypatch.chdir(tmp_path)
    config = load_config(os.path.join(PROJECT_ROOT, "configs", "demo.yaml"),
                         ["data.kind=captions", "data.path=mine.jsonl"])
    assert config.train.init_from == os.path.join(PROJECT_ROOT, "checkpoints", "demo_eps.ckpt")
    assert config.data.path == str(tmp_path / "mine.jsonl")


def test_a_shipped_vocabulary_is_recorded_by_its_project_name(tmp_path, monkeypatch):
    """A model.vocab of configs/demo_vocab.txt is saved as that name, which names the project's file from any
    directory (a checkpoint trained on one machine samples on another), even one holding a file of that
    name; a user's own vocabulary is recorded absolute."""
    import yaml
    from mind_diffusion.config import config_to_dict, load_config
    from mind_diffusion.paths import PROJECT_ROOT, recorded_path
    monkeypatch.chdir(tmp_path)
    config = load_config(os.path.join(PROJECT_ROOT, "configs", "demo.yaml"), ["model.vocab=configs/demo_vocab.txt"])
    assert config_to_dict(config)["model"]["vocab"] == os.path.join("configs", "demo_vocab.txt")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo_vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nmine\n", encoding="utf-8")
    assert recorded_path(config.model.vocab) == os.path.join(PROJECT_ROOT, "configs", "demo_vocab.txt")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"model": {"arch": "glide", "vocab": "configs/demo_vocab.txt"}}))
    mine = load_config(str(tmp_path / "recipe.yaml"))
    assert mine.model.vocab == str(tmp_path / "configs" / "demo_vocab.txt")
    assert recorded_path(mine.model.vocab) == mine.model.vocab


def test_vocab_and_init_exclude_are_refused_where_they_mean_nothing():
    with pytest.raises(ConfigError, match="model.vocab.*arch 'unet' reads no text"):
        config_from_dict({"model": {"arch": "unet", "vocab": "configs/demo_vocab.txt"}})
    with pytest.raises(ConfigError, match="train.init_exclude.*no train.init_from"):
        config_from_dict({"train": {"init_exclude": ["token_embedding"]}})
    config = config_from_dict({"train": {"init_from": "a.ckpt", "init_exclude": "token_embedding,final_ln"}})
    assert config.train.init_exclude == ["token_embedding", "final_ln"]


def test_sample_sampler_names_are_the_schedulers():
    from mind_diffusion.config import SAMPLERS, config_from_dict
    from mind_diffusion.sampling.schedulers import SCHEDULERS
    assert set(SAMPLERS) == set(SCHEDULERS)
    for name in SAMPLERS:
        assert config_from_dict({"sample": {"sampler": name}}).sample.sampler == name


def test_copied_constants_equal_their_sources():
    """config imports neither models/ nor the data package; its copies of their constants stay equal."""
    from mind_diffusion.config import CLASSIFIER_POOLS, DEMO_BACKGROUND_SHARE, DEMO_NUM_CLASSES
    from mind_diffusion.data.demo import BACKGROUND_SHARE, NUM_CLASSES
    from models.classifier import POOLS
    assert DEMO_NUM_CLASSES == NUM_CLASSES and DEMO_BACKGROUND_SHARE == BACKGROUND_SHARE
    assert set(CLASSIFIER_POOLS) == set(POOLS)


CLASSIFIER = {"model": {"arch": "classifier", "image_size": 16, "num_channels": 32, "channel_mult": [1, 2],
                        "attention_resolutions": [8], "num_head_channels": 32, "num_classes": 40},
              "data": {"kind": "demo"}}


def test_classifier_recipe_reads_labels_as_targets():
    import copy
    config = config_from_dict(copy.deepcopy(CLASSIFIER))
    assert config.data.class_cond is True and config.model.class_cond is False
    assert config_from_dict(config_to_dict(config)).data.class_cond is True  # the saved config reloads


@pytest.mark.parametrize("overrides, key", [
    (["model.class_cond=true"], "model.class_cond"),
    (["model.learn_sigma=true"], "model.learn_sigma"),
    (["model.num_head_channels=-1"], "model.num_head_channels"),
    (["model.num_classes=10"], "model.num_classes"),        # fewer than the demo set's 40 labels
    (["data.kind=captions", "data.path=pairs.jsonl"], "data.kind"),   # captions carry no labels
])
def test_classifier_recipe_errors_name_the_key(overrides, key):
    import copy
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict(copy.deepcopy(CLASSIFIER), overrides)


def test_demo_background_share_is_a_probability():
    assert config_from_dict({}, ["data.demo_background_share=1"]).data.demo_background_share == 1.0
    for bad in ("-0.1", "1.5"):
        assert "data.demo_background_share" in error_of(overrides=[f"data.demo_background_share={bad}"])
