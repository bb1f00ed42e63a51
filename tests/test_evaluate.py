"""``python -m mind_diffusion.evaluate``: each metric's JSON against the library computed directly.

A tiny 1-channel 32 px UNet (configs/tiny.yaml with overrides, fresh weights, T = 6) stands for a
trained MNIST model; MNIST test digits stand for good samples. The library pieces themselves are
tested in test_fid.py, test_inception.py, test_classifier_score.py and the bpd tests.
"""
import json
import os

import mindspore as ms
import numpy as np
import pytest

from mind_diffusion import evaluate
from mind_diffusion.cli.factory import build_diffusion, build_model
from mind_diffusion.config import config_to_dict, load_config
from mind_diffusion.data import mnist
from mind_diffusion.evaluation import classifier_score as cs
from mind_diffusion.evaluation import fid
from mind_diffusion.evaluation.bpd import calc_bpd_loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MNIST = ["model.arch=unet", "model.in_channels=1", "model.image_size=32", "model.attention_resolutions=[16]",
              "data.kind=folder", "data.path=unused", "diffusion.steps=6", "sample.sampler=ddim", "sample.steps=2"]


@pytest.fixture(scope="module")
def tiny_mnist(tmp_path_factory):
    """(checkpoint path, config, network) of a fresh 1-channel 32 px UNet with its recipe."""
    config = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), TINY_MNIST)
    model, _ = build_model(config.model)
    path = str(tmp_path_factory.mktemp("tiny_mnist") / "tiny.ckpt")
    params = [{"name": f"model.{name}", "data": param} for name, param in model.parameters_and_names()]
    ms.save_checkpoint(params, path, append_dict={"step": 1, "config": json.dumps(config_to_dict(config))})
    return path, config, model


@pytest.fixture(scope="module")
def digits():
    images, labels = mnist.load_mnist("test")
    return mnist.padded(images[:8]), labels[:8]


def run(argv, capsys):
    status = evaluate.main(argv)
    out, err = capsys.readouterr()
    return status, (json.loads(out) if status == 0 else None), err


def test_help_names_every_metric(capsys):
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for metric in evaluate.METRICS:
        assert metric in text
    assert "--ckpt" in text and "--data" in text and "--out" in text


def test_bpd_is_calc_bpd_loop_over_the_first_images(tiny_mnist, digits, tmp_path, capsys):
    path, config, model = tiny_mnist
    out = tmp_path / "bpd.json"
    status, result, err = run(["bpd", "--ckpt", path, "--data", "mnist", "--num-images", "3", "--batch-size", "2",
                               "--seed", "5", "--out", str(out)], capsys)
    assert status == 0, err
    assert json.loads(out.read_text()) == result
    # Direct: two batches of 2 (the second padded with the last image), seeds seed·1000003 + start.
    diffusion = build_diffusion(config.diffusion, config.model)
    x = digits[0][:3].astype(np.float32) / 127.5 - 1.0
    first = calc_bpd_loop(diffusion, model, x[[0, 1]], seed=5 * 1_000_003)["total_bpd"]
    second = calc_bpd_loop(diffusion, model, x[[2, 2]], seed=5 * 1_000_003 + 2)["total_bpd"][:1]
    totals = np.concatenate([first, second])
    assert result["num_images"] == 3 and result["timesteps"] == 6
    assert result["bpd"] == pytest.approx(totals.mean(), rel=1e-6)
    assert result["bpd_std"] == pytest.approx(totals.std(), rel=1e-5)
    # The output file is never replaced.
    status, _, err = run(["bpd", "--ckpt", path, "--data", "mnist", "--out", str(out)], capsys)
    assert status == 2 and "exists" in err


def test_score_of_real_digits_and_its_histogram(digits, tmp_path, capsys):
    images, labels = digits
    samples = tmp_path / "digits.npz"
    np.savez(samples, images=images)
    status, result, err = run(["score", "--samples", str(samples)], capsys)
    assert status == 0, err
    probs = cs.softmax(cs.MnistClassifier().logits(images))
    assert result["score"] == pytest.approx(cs.inception_score(probs)[0], rel=1e-9)
    # The classifier reads real test digits right: the histogram is their labels'.
    assert result["class_histogram"] == np.bincount(labels, minlength=10).tolist()
    assert result["num_samples"] == 8


def test_score_samples_a_checkpoint(tiny_mnist, tmp_path, capsys):
    path, _, _ = tiny_mnist
    saved = tmp_path / "samples.npz"
    status, result, err = run(["score", "--ckpt", path, "--num-samples", "3", "--batch-size", "2",
                               "--save-samples", str(saved)], capsys)
    assert status == 0, err
    assert (result["sampler"], result["steps"]) == ("ddim", 2)  # the recipe's sample settings
    assert sum(result["class_histogram"]) == 3 and 1.0 <= result["score"] <= 10.0
    with np.load(saved) as f:
        assert f["images"].shape == (3, 1, 32, 32) and f["images"].dtype == np.uint8


def test_fid_and_kid_against_the_features_directly(digits, tmp_path, capsys):
    images, _ = digits
    samples = tmp_path / "samples.npz"
    np.savez(samples, images=images[4:8])
    common = ["--samples", str(samples), "--data", "mnist", "--num-ref", "4", "--inception-batch", "4",
              "--cache-dir", str(tmp_path / "cache")]
    status, result, err = run(["fid"] + common, capsys)
    assert status == 0, err
    extractor = evaluate.feature_extractor(None, 4)  # the one the command built (one compile per process)
    ours = extractor(images[4:8])
    with np.load(result["reference_cache"]) as cached:
        ref = cached["features"].astype(np.float64)
    assert result["num_ref"] == 4 and ref.shape == (4, 2048)
    np.testing.assert_allclose(ref, extractor(images[:4]), rtol=1e-6, atol=1e-6)  # float32 in the cache
    # Independent value without sqrtm: with centred features X (Σ = XᵀX/(N−1)), the non-zero eigenvalues of
    # Σ₁Σ₂ are the squared singular values of X₁X₂ᵀ/√((N₁−1)(N₂−1)), so Tr((Σ₁Σ₂)^½) is their sum.
    x1, x2 = ours - ours.mean(axis=0), ref - ref.mean(axis=0)
    trace_root = np.linalg.svd(x1 @ x2.T, compute_uv=False).sum() / np.sqrt(3 * 3)
    expect = (((ours.mean(axis=0) - ref.mean(axis=0)) ** 2).sum() + (x1 ** 2).sum() / 3 + (x2 ** 2).sum() / 3
              - 2 * trace_root)
    assert result["fid"] == pytest.approx(expect, rel=1e-4)
    status, result, err = run(["kid", "--kid-subsets", "3", "--kid-subset-size", "3", "--seed", "2"] + common, capsys)
    assert status == 0, err
    mean, std = fid.kernel_inception_distance(ours, ref.astype(np.float32), 3, 3, seed=2)
    assert (result["kid"], result["kid_std"]) == pytest.approx((mean, std), rel=1e-6, abs=1e-9)


def test_bad_requests_say_what_to_do(digits, tmp_path, capsys):
    status, _, err = run(["bpd", "--data", "mnist"], capsys)
    assert status == 2 and "bpd needs --ckpt" in err
    wrong = tmp_path / "float.npz"
    np.savez(wrong, images=np.zeros((2, 1, 32, 32), np.float32))
    status, _, err = run(["score", "--samples", str(wrong)], capsys)
    assert status == 2 and "must be uint8" in err
    rgb = tmp_path / "rgb.npz"
    np.savez(rgb, images=np.zeros((2, 3, 32, 32), np.uint8))
    status, _, err = run(["score", "--samples", str(rgb)], capsys)
    assert status == 2 and "1-channel samples" in err
    status, _, err = run(["fid", "--samples", str(rgb), "--data", "mnist", "--num-ref", "2"], capsys)
    assert status == 2 and "compare images of one size" in err
    gray = tmp_path / "gray.npz"
    np.savez(gray, images=np.zeros((2, 1, 32, 32), np.uint8))
    for data in ("fashion_mnist", "fashion_mnist-train"):  # the digit classifier rates digits, not garments
        status, _, err = run(["score", "--samples", str(gray), "--data", data], capsys)
        assert status == 2 and "use fid or kid" in err and repr(data) in err
    status, result, _ = run(["score", "--samples", str(gray), "--data", "mnist"], capsys)
    assert status == 0 and result["num_samples"] == 2


def test_sample_blocks_shard_resume_and_merge(tiny_mnist, tmp_path, capsys):
    path, config, _ = tiny_mnist
    _, generator = evaluate.load_model(path)
    settings = {"sampler": "ddim", "steps": 2, "eta": 0.0, "guidance_scale": 1.0}
    shards = str(tmp_path / "shards")
    manifest = dict(settings, num_samples=5, batch_size=2, seed=3)
    # Two workers, one after the other: worker 0 draws blocks 0 and 2, worker 1 block 1.
    for rank in (0, 1):
        evaluate.sample_blocks(generator, 5, settings, 2, 3, shards, manifest, rank=rank, world=2, progress=False)
    merged = evaluate.merge_blocks(shards, 5, 2)
    assert merged.shape == (5, 1, 32, 32) and merged.dtype == np.uint8
    # Block k is drawn with its own seed, whoever draws it.
    block1 = evaluate.draw_samples(generator, 2, settings, 2, 3 * 1_000_003 + 1, progress=False, first=2)
    np.testing.assert_array_equal(merged[2:4], block1)
    # A killed run: block 1 lost; running again draws only it, and the same samples come back.
    os.remove(os.path.join(shards, "block_000001.npz"))
    with pytest.raises(evaluate.EvaluationError, match="1 of 3 sample blocks are missing"):
        evaluate.merge_blocks(shards, 5, 2)
    kept = os.stat(os.path.join(shards, "block_000000.npz")).st_mtime_ns
    evaluate.sample_blocks(generator, 5, settings, 2, 3, shards, manifest, progress=False)
    assert os.stat(os.path.join(shards, "block_000000.npz")).st_mtime_ns == kept
    np.testing.assert_array_equal(evaluate.merge_blocks(shards, 5, 2), merged)
    # Other settings never mix into the same folder.
    with pytest.raises(evaluate.EvaluationError, match="other settings \\(seed\\)"):
        evaluate.sample_blocks(generator, 5, settings, 2, 4, shards, dict(manifest, seed=4), progress=False)
    # The command with --shard-dir (one worker) samples through the blocks and resumes the same way.
    status, result, err = run(["score", "--ckpt", path, "--num-samples", "3", "--batch-size", "2",
                               "--shard-dir", str(tmp_path / "cmd_shards")], capsys)
    assert status == 0, err
    assert result["shard_dir"] == str(tmp_path / "cmd_shards") and sum(result["class_histogram"]) == 3
    status, _, err = run(["bpd", "--ckpt", path, "--workers", "2", "--shard-dir", shards], capsys)
    assert status == 2 and "not bpd" in err


def test_text_samples_take_the_reference_captions_in_a_seeded_order():
    # An ordered reference (the emoji set goes through its code points, each picture once per
    # language): the first 10 samples of 40 captions must not all come from its first 10.
    captions = [f"emoji {k // 2} {'en' if k % 2 == 0 else 'zh'}" for k in range(40)]
    drawn = evaluate.sample_captions(captions, 0, 10, seed=0)
    assert set(drawn) <= set(captions) and len(set(drawn)) == 10
    assert max(captions.index(c) for c in drawn) >= 10
    # The whole set, block by block (as workers draw it), is one permutation, then cycles.
    whole = evaluate.sample_captions(captions, 0, 80, seed=0)
    blocks = [c for first in range(0, 80, 16) for c in evaluate.sample_captions(captions, first, 16, seed=0)]
    assert blocks == whole and sorted(whole[:40]) == sorted(captions) and whole[40:] == whole[:40]
    # Another seed, another order; the same seed, the same order.
    assert evaluate.sample_captions(captions, 0, 40, seed=1) != whole[:40]
    assert evaluate.sample_captions(captions, 5, 3, seed=0) == whole[5:8]
