"""Train the MNIST recipe (configs/mnist.yaml, improved-diffusion's settings) and measure what it learned.

    python bench/mnist_fidelity.py --steps 3000 [--out bench_out/mnist_fidelity]

1. trains ``--steps`` steps with ``python -m mind_diffusion.cli.train`` (the recipe unchanged but
   for its length), recording train images/s; ``--ckpt`` measures a checkpoint already trained instead;
2. test bits/dim of the EMA model on the first ``--bpd-images`` (128) MNIST test images, over all
   1000 steps of the bound, with its std over images;
3. draws ``--fid-samples`` (1000) samples with the recipe's sampler on ``--sample-steps`` (100)
   respaced steps; the first ``--score-samples`` (256) of them are scored by ccexam's MNIST
   classifier (Inception-score formula, class histogram) and all are compared with the test set
   (``--num-ref``, default all 10 000) by FID;
4. writes the sample grid (first 64), the run's metrics and ``mnist_fidelity.json`` into ``--out``,
   and prints the JSON.

Train images/s is the steady rate between the first and the last log line (graph compilation
excluded), from the trainer's own cumulative figures in metrics.jsonl. The reference features of
the test set are computed once and cached (``$MIND_DIFFUSION_CACHE/fid``); on two CPU cores they
take about 15 minutes, the 1000 samples' under two. The whole 3000-step run took 1 h 39 min there.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "mnist.yaml")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000, help="training steps")
    parser.add_argument("--ckpt", help="measure this checkpoint of the recipe (e.g. runs/mnist/ckpt_00003000.ckpt "
                                       "from run_train.sh) instead of training one; train images/s is then not "
                                       "measured")
    parser.add_argument("--out", default="bench_out/mnist_fidelity", help="output folder (must not hold a run)")
    parser.add_argument("--bpd-images", type=int, default=128, help="test images whose bits/dim is measured")
    parser.add_argument("--score-samples", type=int, default=256, help="samples scored by the classifier")
    parser.add_argument("--fid-samples", type=int, default=1000, help="samples compared with the test set by FID")
    parser.add_argument("--num-ref", type=int, default=10000, help="test images of the FID reference")
    parser.add_argument("--sample-steps", type=int, default=100, help="respaced sampling steps")
    parser.add_argument("--batch-size", type=int, default=64, help="images per sampling / bits/dim batch")
    parser.add_argument("--seed", type=int, default=0, help="seeds the samples and the bound's noise")
    args = parser.parse_args(argv)
    if min(args.steps, args.bpd_images, args.score_samples, args.fid_samples, args.num_ref, args.batch_size) < 1:
        parser.error("every count must be at least 1")
    if args.score_samples > args.fid_samples:
        parser.error("--score-samples takes the first of the FID samples: it cannot exceed --fid-samples")
    return args


def train(steps, run_dir):
    """Run the recipe for ``steps`` steps into ``run_dir``; return (checkpoint, steady train images/s)."""
    log_every = max(1, steps // 10)
    command = [sys.executable, "-m", "mind_diffusion.cli.train", "--config", RECIPE, "--run-dir", run_dir,
               "--no-progress", "--set", f"train.total_steps={steps}", "--set", f"train.log_every={log_every}",
               "--set", f"train.save_every={steps}"]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)
    from mind_diffusion.checkpoints import latest_checkpoint
    from mind_diffusion.config import load_config
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return latest_checkpoint(run_dir), steady_rate(records, load_config(RECIPE).train.batch_size)


def steady_rate(records, batch_size):
    """Images/s between the first and last log line: the trainer logs cumulative images/s since the start,
    so t(s) = s·B / rate(s), and the rate over (s₁, s₂] is (s₂ − s₁)·B / (t(s₂) − t(s₁))."""
    rated = [r for r in records if r.get("images_per_s")]
    if len(rated) < 2:
        return rated[-1]["images_per_s"] if rated else None
    first, last = rated[0], rated[-1]
    t1, t2 = (r["step"] * batch_size / r["images_per_s"] for r in (first, last))
    return round((last["step"] - first["step"]) * batch_size / (t2 - t1), 2)


def main(argv=None):
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    if os.path.exists(os.path.join(out, "mnist_fidelity.json")):
        sys.exit(f"error: {out} already holds a result; choose another --out")
    os.makedirs(out, exist_ok=True)
    started = time.perf_counter()
    if args.ckpt:
        if not os.path.isfile(args.ckpt):
            sys.exit(f"error: --ckpt {args.ckpt}: no such file")
        checkpoint, images_per_s = os.path.abspath(args.ckpt), None
    else:
        checkpoint, images_per_s = train(args.steps, os.path.join(out, "run"))

    import mindspore as ms
    from mind_diffusion import evaluate as ev
    from mind_diffusion.imaging import save_grid

    ms.set_context(mode=ms.GRAPH_MODE)
    config, generator = ev.load_model(checkpoint)
    from mind_diffusion.checkpoints import checkpoint_step, read_checkpoint
    result = {"recipe": "configs/mnist.yaml", "steps": checkpoint_step(read_checkpoint(checkpoint)),
              "checkpoint": checkpoint,
              "train_images_per_s": images_per_s}

    test = ev.load_reference("mnist", config, args.bpd_images)
    bpd = ev.bits_per_dim(generator, test, args.batch_size, args.seed)
    result["bpd"] = {k: bpd[k] for k in ("bpd", "bpd_std", "bpd_stderr", "prior_bpd", "num_images", "timesteps")}

    settings = {"sampler": config.sample.sampler, "steps": args.sample_steps, "eta": config.sample.eta,
                "guidance_scale": 1.0}
    samples = ev.draw_samples(generator, args.fid_samples, settings, args.batch_size, args.seed)
    np.savez(os.path.join(out, "samples.npz"), images=samples)
    result["sampling"] = dict(settings, seed=args.seed)
    result["score"] = ev.classifier_metrics(samples[:args.score_samples])
    reference = ev.load_reference("mnist", config, args.num_ref)
    fid = ev.inception_metrics("fid", samples, reference)
    result["fid"] = {k: fid[k] for k in ("fid", "num_samples", "num_ref", "reference_cache", "inception_sha1")}

    grid = samples[:64].transpose(0, 2, 3, 1)
    result["grid"] = save_grid(grid, os.path.join(out, "grid.png"), scale=2, overwrite=False)
    result["seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(result, indent=2)
    with open(os.path.join(out, "mnist_fidelity.json"), "x") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
