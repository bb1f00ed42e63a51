"""Our CPU speed against PyTorch's, measured alternately in one run on one machine.

Three implementations of the same work (the improved-diffusion CIFAR-10 UNet,
9.93 M parameters, fp32, batch 16, cosine T = 4000, hybrid loss):

- ``ours``: bench/train_throughput.py, bench/sample_speed.py, bench/model_speed.py;
- ``torch_port``: bench/torch_reference.py, the network written in PyTorch module
  for module as ours (``--torch-python``);
- ``improved``: openai/improved-diffusion's own code, when you pass a checkout of it
  (``--improved-diffusion``; fetched by you, never part of this project), run by
  bench/improved_diffusion_bench.py.

Each round runs every work (train step, DDPM-K and DDIM-K sampling, batch-1 and
batch-16 forward) once per implementation, each in a fresh process, in an order
rotated from round to round, so that load on a shared machine falls on all alike.
Prints each figure's median over the rounds, and ours against the faster
reference: images/s ratios (higher is better for us) and, for the forward,
reference ms / our ms. Last, how close our train step comes to this machine's
limit: its fp32 matmul peak and the FLOPs of a trained image (bench/torch_reference.py
``--only limit``). ``--json PATH`` writes every figure.

    python bench/compare_pytorch.py --torch-python torchenv/bin/python [--improved-diffusion PATH] [--rounds 3]

torch stays out of this project's environment: give the Python of a separate one
(``python -m venv torchenv && torchenv/bin/pip install torch numpy``).
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys

from tqdm import tqdm

BENCH = os.path.dirname(os.path.abspath(__file__))
WORKS = ("train", "sample", "forward")
# What each bench prints (ours and the two references print these same shapes).
PATTERNS = {
    "train images/s": re.compile(r"step.*→ ([\d.]+) images/s"),
    "DDPM images/s": re.compile(r"DDPM-\d+:.*\(([\d.]+) images/s\)"),
    "DDIM images/s": re.compile(r"DDIM-\d+:.*\(([\d.]+) images/s\)"),
    "forward b1 ms": re.compile(r"batch\s+1:.*median\s+([\d.]+) ms"),
    "forward b16 ms": re.compile(r"batch\s+16:.*median\s+([\d.]+) ms"),
    "forward GFLOP": re.compile(r"forward FLOPs per image: ([\d.]+) GFLOP"),
    "matmul GFLOP/s": re.compile(r"fp32 matmul peak: ([\d.]+) GFLOP/s"),
}
FIGURES_OF = {"train": ["train images/s"], "sample": ["DDPM images/s", "DDIM images/s"],
              "forward": ["forward b1 ms", "forward b16 ms"]}


def commands(args):
    """{implementation: {work: argv}}."""
    ours = {"train": [sys.executable, os.path.join(BENCH, "train_throughput.py"), "--steps", str(args.steps)],
            "sample": [sys.executable, os.path.join(BENCH, "sample_speed.py"), "--steps", str(args.sample_steps)],
            "forward": [sys.executable, os.path.join(BENCH, "model_speed.py"), "--batch-sizes", "1", "16",
                        "--repeats", str(args.repeats)]}
    shared = ["--threads", str(args.threads), "--steps", str(args.steps), "--sample-steps", str(args.sample_steps),
              "--batch-sizes", "1", "16", "--repeats", str(args.repeats)]
    table = {"ours": ours,
             "torch_port": {w: [args.torch_python, os.path.join(BENCH, "torch_reference.py"), "--only", w, *shared]
                            for w in WORKS}}
    if args.improved_diffusion:
        table["improved"] = {w: [args.torch_python, os.path.join(BENCH, "improved_diffusion_bench.py"),
                                 "--checkout", args.improved_diffusion, "--only", w, *shared] for w in WORKS}
    return table


def run_one(argv, figures):
    """Run one bench process; {figure: value} read from what it printed."""
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"error: {' '.join(argv)} failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    found = {}
    for name in figures:
        match = PATTERNS[name].search(result.stdout)
        if match is None:
            raise SystemExit(f"error: {' '.join(argv)} printed no {name!r}; its output:\n{result.stdout[-2000:]}")
        found[name] = float(match.group(1))
    return found


def ratio(name, ours, reference):
    """How many times faster we are: images/s ours/reference, or ms reference/ours."""
    return reference / ours if name.endswith("ms") else ours / reference


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--torch-python", required=True, help="the Python of a separate environment with torch")
    parser.add_argument("--improved-diffusion", metavar="PATH", help="a checkout of openai/improved-diffusion")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds (median over them; default 3)")
    parser.add_argument("--steps", type=int, default=10, help="timed train steps per process (default 10)")
    parser.add_argument("--sample-steps", type=int, default=50, help="respaced sampling steps (default 50)")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per batch size (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2: this machine's cores)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure of every round here")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if not os.access(args.torch_python, os.X_OK):
        parser.error(f"--torch-python {args.torch_python}: no such executable")
    table = commands(args)
    names = list(table)
    runs = {name: {figure: [] for figures in FIGURES_OF.values() for figure in figures} for name in names}
    plan = [(r, work, names[(i + r) % len(names):] + names[:(i + r) % len(names)])
            for r in range(args.rounds) for i, work in enumerate(WORKS)]
    with tqdm(total=args.rounds * len(WORKS) * len(names), desc="benches", unit="run") as bar:
        for _, work, order in plan:
            for name in order:  # rotated: no implementation always runs first or last
                for figure, value in run_one(table[name][work], FIGURES_OF[work]).items():
                    runs[name][figure].append(value)
                bar.update()
    medians = {name: {f: statistics.median(v) for f, v in figures.items()} for name, figures in runs.items()}
    references = [n for n in names if n != "ours"]
    print(f"\nmedians over {args.rounds} round(s), batch 16 unless stated; ratio = ours against the faster reference")
    print(f"{'figure':<16}" + "".join(f"{n:>14}" for n in names) + f"{'ratio':>9}")
    for figure in medians["ours"]:
        best = (min if figure.endswith("ms") else max)(medians[n][figure] for n in references)
        print(f"{figure:<16}" + "".join(f"{medians[n][figure]:>14.2f}" for n in names)
              + f"{ratio(figure, medians['ours'][figure], best):>8.2f}×")
    limit = run_one(table["torch_port"]["forward"][:2] + ["--only", "limit", "--threads", str(args.threads)],
                    ["forward GFLOP", "matmul GFLOP/s"])
    train_gflops = 3 * limit["forward GFLOP"] * medians["ours"]["train images/s"]
    print(f"\nthis machine's fp32 matmul peak: {limit['matmul GFLOP/s']:.1f} GFLOP/s; a trained image is about "
          f"3 × {limit['forward GFLOP']:.3f} GFLOP, so our train step runs at {train_gflops:.1f} GFLOP/s, "
          f"{100 * train_gflops / limit['matmul GFLOP/s']:.0f}% of the peak")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"rounds": runs, "medians": medians}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
