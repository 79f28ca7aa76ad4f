"""Data-parallel training on CPU: two gloo processes of one thread each against one process of one
thread, on the same global batch, and where the time of the two-process step goes.

    python -m bench.bench_distributed --out DIR [--batches 1024,256] [--steps 40] [--rounds 5]

ML-100K at the protocol's shapes (K=4, L=50, D=64, 512 negatives, side features), the real
training step (`retrieval.train.run_steps`, with `GradientSync` between the ranks). Three
processes stay up for the whole run: one alone, and a gloo group of two. They run in
alternating rounds (one process at batch B, the pair at global batch B, one process at
batch B/2), so a shared machine's slow spells fall on every configuration alike. A
process runs only while the others wait on their queues, so the pair has the machine's
cores to itself in its rounds.

Where the pair's step time goes: the compute of a B/2 share (measured alone as the
B/2 rounds), the all-reduce of the gradients (measured after a barrier, so that it
excludes waiting for the other rank), the waiting inside the step's all-reduce for the
other rank, and the rest. CPU time (all of a process's threads) is recorded beside wall
time: on a machine whose cores are shared with other work, a process's wall time beyond
its CPU time is time it waited for a core.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from retrieval.artifacts import atomic_write_bytes, atomic_write_json, package_versions  # noqa: E402

ML100K = ROOT.parent / "shared" / "datasets" / "ml-100k"


def _load():
    from retrieval.data import DataSpec, load_dataset, split_users

    spec = DataSpec(ML100K / "interactions.csv", ML100K / "items.csv", ML100K / "users.csv",
                    user_features=("age", "gender", "occupation"))
    ds = load_dataset(spec)
    return ds, split_users(ds, 2026)


def _worker(rank: int, role: str, world: int, rendezvous: str, commands: Any, results: Any) -> None:
    """A training process: `role` "alone" (world 1) or "pair" (rank of a gloo group of `world`).
    Each command (batch, steps) runs that many steps and reports wall and all-reduce seconds."""
    torch.set_num_threads(1)
    from retrieval.distributed import GradientSync
    from retrieval.train import TrainConfig, model_config_for, run_steps, setup

    if role == "pair":
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    ds, split = _load()
    setups: dict[int, Any] = {}
    done: dict[int, int] = {}
    while True:
        cmd = commands.get()
        if cmd is None:
            break
        batch, steps = cmd
        if batch not in setups:
            setups[batch] = setup(ds, split, model_config_for(ds, interests=4, dim=64, max_len=50),
                                  TrainConfig(batch_size=batch, negatives=512, threads=1, seed=0))
            done[batch] = 0
        st = setups[batch]
        n = len(st.users)
        order = np.random.default_rng(done[batch]).permutation(n)[: steps * batch]
        sync0 = st.sync.seconds if st.sync is not None else 0.0
        if role == "pair":
            dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = run_steps(ds, st, order, batch)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        sync = (st.sync.seconds - sync0) if st.sync is not None else 0.0
        pure = 0.0
        if role == "pair":  # the all-reduce alone: both ranks start it together, so no waiting is in it
            probe = GradientSync(st.model, st.sync.group)
            for p in st.model.parameters():  # the summed sparse gradients, as one rank's own: each row once
                if p.grad is not None and p.grad.is_sparse:
                    p.grad = p.grad.coalesce()
            for _ in range(steps):
                dist.barrier()
                probe(torch.zeros(()))
            pure = probe.seconds
            for o in st.opts:
                o.zero_grad(set_to_none=True)
        done[batch] += steps
        results.put({"rank": rank, "role": role, "batch": batch, "steps": steps, "wall": wall, "cpu": cpu, "sync": sync,
                     "allreduce": pure, "loss": loss})
    if role == "pair":
        dist.destroy_process_group()


def _load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(batches: list[int], steps: int, rounds: int, out: Path) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    rendezvous = out / ".rendezvous"
    rendezvous.unlink(missing_ok=True)
    queues = {name: ctx.Queue() for name in ("alone", "pair0", "pair1")}
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(0, "alone", 1, "", queues["alone"], results)),
             ctx.Process(target=_worker, args=(0, "pair", 2, str(rendezvous), queues["pair0"], results)),
             ctx.Process(target=_worker, args=(1, "pair", 2, str(rendezvous), queues["pair1"], results))]
    for p in procs:
        p.start()
    load_before = _load_average()
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []

    def alone(batch: int) -> None:
        queues["alone"].put((batch, steps))
        rows.append({**results.get(), "config": f"1 process B={batch}"})

    def pair(batch: int) -> None:
        queues["pair0"].put((batch, steps))
        queues["pair1"].put((batch, steps))
        for _ in range(2):
            rows.append({**results.get(), "config": f"2 processes B={batch}"})

    try:
        for batch in batches:  # a warm-up round of each (allocations, optimizer state), not recorded
            alone(batch), pair(batch), alone(batch // 2)
        rows.clear()
        for _ in range(rounds):
            for batch in batches:
                alone(batch)
                pair(batch)
                alone(batch // 2)
    finally:
        for q in queues.values():
            q.put(None)
        for p in procs:
            p.join(timeout=60)
        rendezvous.unlink(missing_ok=True)
    return {
        "bench": "distributed",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "torch_threads_per_process": 1, "python": platform.python_version(),
                    "load_average_before": load_before, "load_average_after": _load_average()},
        "versions": package_versions(),
        "data": "ml-100k, split seed 2026, train users' windows",
        "model": {"interests": 4, "dim": 64, "max_len": 50, "negatives": 512},
        "steps_per_round": steps,
        "rounds": rounds,
        "summary": {str(b): summarise(rows, b) for b in batches},
        "rows": rows,
        "seconds": time.perf_counter() - t0,
    }


def summarise(rows: list[dict[str, Any]], batch: int) -> dict[str, Any]:
    """Median per-step milliseconds over rounds for each configuration, the speed-up and the
    decomposition of the pair's step."""
    def ms(config: str, key: str = "wall", rank: int | None = None) -> float:
        vals = [1000 * r[key] / r["steps"] for r in rows if r["config"] == config and (rank is None or r["rank"] == rank)]
        return float(np.median(vals))

    one, half = ms(f"1 process B={batch}"), ms(f"1 process B={batch // 2}")
    two = max(ms(f"2 processes B={batch}", rank=0), ms(f"2 processes B={batch}", rank=1))
    allreduce = float(np.mean([ms(f"2 processes B={batch}", "allreduce", r) for r in (0, 1)]))
    sync = float(np.mean([ms(f"2 processes B={batch}", "sync", r) for r in (0, 1)]))
    cpu_one, cpu_half = ms(f"1 process B={batch}", "cpu"), ms(f"1 process B={batch // 2}", "cpu")
    cpu_two = float(np.mean([ms(f"2 processes B={batch}", "cpu", r) for r in (0, 1)]))
    return {
        "one_process_cpu_ms": cpu_one,  # CPU time of the process per step (all its threads)
        "half_batch_cpu_ms": cpu_half,
        "two_process_cpu_ms_per_rank": cpu_two,
        "one_process_step_ms": one,
        "two_process_step_ms": two,
        "one_process_samples_per_s": batch / one * 1000,
        "two_process_samples_per_s": batch / two * 1000,
        "speedup": one / two,
        "half_batch_step_ms": half,  # what each rank computes, measured alone
        "allreduce_ms": allreduce,  # the all-reduce after a barrier: communication alone
        "sync_ms": sync,  # the all-reduce inside the step: communication + waiting for the other rank
        "waiting_ms": max(sync - allreduce, 0.0),
        "other_ms": two - half - sync,  # the rest: the pair's compute beyond a lone half-batch step
        "compute_share": half / two,
    }


def table(result: dict[str, Any]) -> str:
    lines = [f"bench_distributed: ML-100K, 1 torch thread per process, {result['rounds']} rounds of "
             f"{result['steps_per_round']} steps (load average {result['machine']['load_average_before']} -> "
             f"{result['machine']['load_average_after']})",
             f"{'global B':>8} {'1 proc ms':>10} {'2 proc ms':>10} {'speed-up':>9} {'B/2 alone':>10} "
             f"{'allreduce':>10} {'waiting':>8} {'other':>7} {'cpu 1p':>7} {'cpu B/2':>8} {'cpu rank':>9}"]
    for b, s in result["summary"].items():
        lines.append(f"{b:>8} {s['one_process_step_ms']:>10.1f} {s['two_process_step_ms']:>10.1f} "
                     f"{s['speedup']:>8.2f}x {s['half_batch_step_ms']:>10.1f} {s['allreduce_ms']:>10.1f} "
                     f"{s['waiting_ms']:>8.1f} {s['other_ms']:>7.1f} {s['one_process_cpu_ms']:>7.1f} "
                     f"{s['half_batch_cpu_ms']:>8.1f} {s['two_process_cpu_ms_per_rank']:>9.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batches", default="1024,256", help="global batch sizes, comma-separated")
    ap.add_argument("--steps", type=int, default=40, help="steps per configuration per round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    if not ML100K.is_dir():
        print(f"error: {ML100K} not found", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    result = run([int(b) for b in args.batches.split(",")], args.steps, args.rounds, args.out)
    atomic_write_json(args.out / "bench_distributed.json", result)
    text = table(result)
    atomic_write_bytes(args.out / "bench_distributed.txt", (text + "\n").encode())
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
