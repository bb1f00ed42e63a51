"""A data-parallel training run under msrun with faults injected, for tests/test_distributed.py.

Usage (under msrun, one process per rank):
    dist_driver.py --run-dir DIR_WITH_{rank} --steps N [--inf-at RANK:STEP] [--resume] [--loss-scale S]

Trains configs/tiny.yaml through the real Trainer. ``--inf-at r:k`` puts +inf into every image of rank r's
batch k (as a corrupt sample would); ``--loss-scale`` turns the dynamic loss scale on (fp32 is fine for
the mechanism). Prints one JSON line per rank: start step, applied optimizer steps, loss scale, state digest.
"""
import argparse
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--inf-at", default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--loss-scale", type=float, default=0.0)
    args = parser.parse_args()

    import numpy as np
    import mindspore as ms
    from mind_diffusion.cli.factory import build_diffusion, build_model
    from mind_diffusion.cli.train import setup_distributed
    from mind_diffusion.config import load_config
    from mind_diffusion.data import pipeline
    from mind_diffusion.train import trainer as trainer_module

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    rank, world = setup_distributed()
    config = load_config(os.path.join(ROOT, "configs", "tiny.yaml"),
                         [f"train.total_steps={args.steps}", "train.save_every=2", "train.log_every=1",
                          "train.sample_every=0", f"train.loss_scale={args.loss_scale or 65536}"])
    if args.loss_scale:
        trainer_module.uses_loss_scale = lambda config: True
    if args.inf_at:
        bad_rank, bad_step = (int(v) for v in args.inf_at.split(":"))
        batch = config.train.batch_size
        original = pipeline._SampleSource.__getitem__

        def poisoned(self, sample):
            row = original(self, sample)
            if self.rank == bad_rank and int(sample) // batch == bad_step:
                row = (np.full_like(row[0], np.inf),) + tuple(row[1:])
            return row
        pipeline._SampleSource.__getitem__ = poisoned

    ms.set_seed(config.seed + rank)  # different initial weights per rank: the broadcast must fix them
    model, tokenizer = build_model(config.model)
    diffusion = build_diffusion(config.diffusion, config.model)
    trainer = trainer_module.Trainer(config, model, diffusion, args.run_dir.format(rank=rank), tokenizer=tokenizer,
                                     rank=rank, world_size=world)
    original_start = trainer.start

    def start(*a, **k):
        step = original_start(*a, **k)
        print(f"[rank {rank}] starting at step {step}", flush=True)
        return step
    trainer.start = start
    trainer.fit(resume="auto" if args.resume else None, progress=False)
    print("RESULT " + json.dumps({
        "rank": rank, "applied": int(trainer.train_step.optimizer.global_step.asnumpy()),
        "loss_scale": float(trainer.train_step.loss_scale.asnumpy()),
        "state": trainer.state_digest()}), flush=True)


if __name__ == "__main__":
    main()
