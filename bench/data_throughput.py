"""Does the input pipeline outrun the train step? Images/s of each data source beside the step's.

Makes a synthetic image set in a temporary folder (smooth random pictures, PNG, ``--source-size`` px,
with captions and two classes), converts it to MindRecord shards, and measures, for the recipe's
batch size, image size and conditioning:

- the pipeline (``mind_diffusion.data.create_dataset``: decode, resize, flips, tokenizer, u and ε)
  for ``data.kind`` captions (JSONL), folder and mindrecord: images/s over ``--batches`` batches
  after the first;
- the conversion to MindRecord: images/s;
- the recipe's compiled train step (``Trainer.train_step``, model and optimizer as the recipe says):
  images/s from the median of ``--steps`` steps after the first (compile).

    python bench/data_throughput.py [--recipe configs/demo.yaml] [--images 512] [--batches 20] [--steps 5]
"""
import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time

import numpy as np


def make_images(root, count, size, seed=0):
    """``count`` smooth random PNGs under root/img/{a,b}/ and a caption file; returns the caption file's path."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(count):
        # a low-frequency picture (4×4 colours upsampled), so PNG sizes are like real images', not noise's
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((size, size), Image.BICUBIC)
        relative = os.path.join("img", "ab"[i % 2], f"{i:06d}.png")
        os.makedirs(os.path.dirname(os.path.join(root, relative)), exist_ok=True)
        image.save(os.path.join(root, relative))
        lines.append(json.dumps({"path": relative, "text": f"第 {i} 张图 picture number {i}"}, ensure_ascii=False))
    captions = os.path.join(root, "captions.jsonl")
    with open(captions, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return captions


def pipeline_rate(data_cfg, batch_size, batches, tokenizer, noise_shape, channels):
    """Images/s of the batch stream over ``batches`` batches after the first."""
    from mind_diffusion.data import create_dataset
    stream = create_dataset(data_cfg, batch_size, tokenizer=tokenizer, end_step=batches + 1,
                            noise_shape=noise_shape, channels=channels)
    iterator = iter(stream)
    next(iterator)  # the pipeline's start-up
    start = time.perf_counter()
    count = sum(len(batch["images"]) for batch in iterator)
    return count / (time.perf_counter() - start)


def step_rate(config, steps, batch):
    """(images/s from the median step time, compile + first step s) of the recipe's train step."""
    import mindspore as ms
    from mind_diffusion.cli.factory import build_diffusion, build_model
    from mind_diffusion.train.trainer import Trainer
    model, tokenizer = build_model(config.model)
    diffusion = build_diffusion(config.diffusion, config.model)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, model, diffusion, run_dir, tokenizer=tokenizer)
        inputs = [ms.Tensor(batch[name]) for name in trainer.step_columns]
        times = []
        for _ in range(steps + 1):
            start = time.perf_counter()
            trainer.train_step(*inputs)[0].asnumpy()
            times.append(time.perf_counter() - start)
    return len(batch["images"]) / statistics.median(times[1:]), times[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--recipe", default="configs/demo.yaml", help="recipe whose step and batch are measured")
    parser.add_argument("overrides", nargs="*", help="recipe key=value overrides (e.g. train.batch_size=16)")
    parser.add_argument("--images", type=int, default=512, help="images in the synthetic set")
    parser.add_argument("--source-size", type=int, default=0, help="side of the stored images (0: 2× the recipe's)")
    parser.add_argument("--shards", type=int, default=2, help="MindRecord shards")
    parser.add_argument("--batches", type=int, default=20, help="timed pipeline batches")
    parser.add_argument("--steps", type=int, default=5, help="timed train steps after the first")
    parser.add_argument("--workers", type=int, default=0, help="data.num_workers (0: the recipe's)")
    parser.add_argument("--device", default=None, choices=["CPU", "Ascend", "GPU"],
                        help="device of the train step (default: Ascend when present, else CPU)")
    args = parser.parse_args()

    import mindspore as ms
    from mind_diffusion.cli.factory import build_model
    from mind_diffusion.config import load_config
    from mind_diffusion.data import mindrecord
    from mind_diffusion.device import jit_level_for, pick_device

    config = load_config(args.recipe, args.overrides)
    target = pick_device(args.device)
    ms.set_context(mode=ms.GRAPH_MODE, jit_config={"jit_level": jit_level_for(config, target)})
    ms.set_device(target)
    size, channels, batch_size = config.model.image_size, config.model.in_channels, config.train.batch_size
    if args.images < (args.batches + 1) * batch_size:
        args.images = (args.batches + 1) * batch_size  # one epoch covers the timed batches: no repeats cached
    _, tokenizer = build_model(config.model)
    noise_shape = (channels, size, size)
    workers = args.workers or config.data.num_workers
    print(f"recipe {args.recipe}: {config.model.arch}, {channels}×{size}×{size}, batch {batch_size}, "
          f"{'text' if tokenizer else 'labels' if config.data.class_cond else 'unconditional'}; device {target}")

    with tempfile.TemporaryDirectory() as root:
        source_size = args.source_size or 2 * size
        captions = make_images(root, args.images, source_size)
        print(f"synthetic set: {args.images} PNGs of {source_size}×{source_size} px")
        start = time.perf_counter()
        mindrecord.convert(captions, os.path.join(root, "shards"), args.shards, progress=False)
        print(f"mindrecord conversion: {args.images / (time.perf_counter() - start):.0f} images/s")
        sources = {"captions (JSONL)": ("captions", captions), "folder": ("folder", os.path.join(root, "img")),
                   "mindrecord": ("mindrecord", os.path.join(root, "shards"))}
        rates = {}
        for name, (kind, path) in sources.items():
            data_cfg = dataclasses.replace(config.data, kind=kind, path=path, num_workers=workers,
                                           class_cond=config.data.class_cond and kind == "folder")
            source_tokenizer = tokenizer if kind != "folder" else None
            rates[name] = pipeline_rate(data_cfg, batch_size, args.batches, source_tokenizer, noise_shape, channels)
            print(f"pipeline {name:17s} {rates[name]:8.0f} images/s"
                  + ("  (no tokens: a folder has no captions)" if tokenizer and kind == "folder" else ""))
        from mind_diffusion.data import create_dataset
        data_cfg = dataclasses.replace(config.data, kind="mindrecord", path=os.path.join(root, "shards"),
                                       class_cond=False)
        if config.data.class_cond:
            data_cfg = dataclasses.replace(data_cfg, kind="folder", path=os.path.join(root, "img"), class_cond=True)
        batch = next(iter(create_dataset(data_cfg, batch_size, tokenizer=tokenizer, end_step=1,
                                         noise_shape=noise_shape, channels=channels)))
    step, compile_s = step_rate(config, args.steps, batch)
    print(f"train step               {step:8.1f} images/s  (median of {args.steps}; compile + first step "
          f"{compile_s:.1f} s)")
    slowest = min(rates, key=rates.get)
    print(f"slowest pipeline ({slowest}) / train step: {rates[slowest] / step:.1f}×"
          + ("" if rates[slowest] > step else "  — the pipeline is the bottleneck"))


if __name__ == "__main__":
    main()
