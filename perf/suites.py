"""The perf suites, as data: which benchmarks each suite runs, on which links and world
sizes, with which flags. ``build_jobs`` turns a suite and a run's settings into the list
of jobs ``perf.runner`` launches.

Every benchmark is one `Spec` of `SPECS`. Its flags are a template; a ``{key}`` in it is
either one of the run's values or a key of the spec's ``values`` table, which gives it per
*case*. The run's values: ``{n}`` (the job's world size), ``{largest}`` and ``{nprocs}``
(the run's largest and all world sizes), ``{link}``/``{links}`` (the job's link, or its
comma list), ``{links_spaced}`` (the same, space separated), ``{rpn}`` ("-2pn" on two-tier
nodes), ``{hybrid_rpn}`` (--ranks-per-node, else half the largest world size),
``{train_steps}`` and ``{methods}`` (the train suite's settings). The cases of a job, first
match wins:

  smallest  the job's world size is the smallest of the run's (per-world-size specs only)
  tiny      ``--tiny``: the smallest sizes, the suite's own test
  quick     the quick suite; ``full`` in every other suite
  any       the fallback

``{out}`` stays in the flags: the runner replaces it with the results folder.
"""
from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

SUITES = ("quick", "collectives", "sparse", "kernels", "train", "all")

# How a job starts (`Job.mpi`, `Job.driver`) and what it leaves behind (`Job.kind`).
LAUNCHES = {
    # mpirun -n N python -m MODULE ... --json RAW: every rank runs the benchmark.
    "mpi": dict(mpi=True, driver=False, kind="bench"),
    # One plain process that writes --json RAW (py-spy records it under --profile).
    "process": dict(mpi=False, driver=False, kind="bench"),
    # One process that launches its own mpirun jobs (through perf.infra.launch, which
    # profiles them) and writes --json RAW.
    "driver": dict(mpi=False, driver=True, kind="bench"),
    # A driver that writes a folder the report reads (FLAGS give it --out {out}/NAME).
    "folder": dict(mpi=False, driver=True, kind="driver"),
    # perf/bench/train_bench.py: the runner adds --link, --nprocs, --out and, for two-tier
    # nodes, --ranks-per-node.
    "train": dict(mpi=False, driver=True, kind="train"),
}


@dataclass(frozen=True)
class Spec:
    """One benchmark of the suites.

    name:    job name template (``{n}``, ``{link}``, ``{rpn}``: "-2pn" for two-tier jobs).
    suites:  the suites that run it (``all`` runs every spec).
    flags:   the benchmark's flags, a template (see the module docstring).
    values:  per-case values of the template's own keys: {key: {case: value}}.
    ranks:   "each": one job per world size of the run; "largest": one job at the largest;
             "one": a single process. Or per case ({case: rule}).
    links:   "each": one job per usable link; "each+holdout": also every held-out link;
             "shm": shm only, and only when the run has it; "local": shm always (a single
             process needs no link); "shaped": the first shaped link (shm when none);
             "all": one job over every link (a driver); "shaped-or-all": one job over the
             shaped links, or over all when there are none. Or per case.
    launch:  a key of LAUNCHES.
    timeout: seconds, or per case ({case: seconds}).
    needs:   a condition on the run ("shaped-even": not tiny, an even largest world size
             and a shaped link), or None.
    """

    name: str
    module: str
    suites: tuple[str, ...]
    flags: str
    values: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    ranks: str | Mapping[str, str] = "each"
    links: str | Mapping[str, str] = "each"
    launch: str = "mpi"
    timeout: float | Mapping[str, float] = 300.0
    needs: str | None = None


SPECS: tuple[Spec, ...] = (
    # Raw MPI sweep: cheap (no torch import), gives the α–β fit its points at every P.
    # Ping-pong does not depend on the world size: measured once, at the smallest.
    Spec("mpi-sweep-n{n}-{link}{rpn}", "perf.bench.pingpong", ("quick", "collectives"),
         "--ops {ops} --sizes {sizes} --budget-mb {budget} {extra}",
         values=dict(ops={"smallest": "pingpong,allreduce", "any": "allreduce"},
                     sizes={"tiny": "1k,64k", "quick": "1k,16k,256k,1m",
                            "full": "1k,16k,256k,1m,4m"},
                     budget={"tiny": "2", "any": "8"},
                     extra={"tiny": "--repeats 1", "any": ""}),
         links="each+holdout", timeout=180),
    # Dense collectives, nccl-tests style: raw mpi4py, commrt and gloo side by side.
    Spec("collectives-n{n}-{link}{rpn}", "perf.bench.collectives", ("quick", "collectives"),
         "--ops {ops} --sizes {sizes} --impls mpi4py,commrt,gloo {timing}",
         values=dict(ops={"quick": "allreduce",
                          "full": "allreduce,allgather,reduce_scatter,broadcast,alltoall"},
                     sizes={"tiny": "4k,64k", "quick": "4k,256k,1m",
                            "full": "1k,16k,256k,1m,4m"},
                     timing={"tiny": "--repeats 1 --budget-mb 1 --min-iters 2 --max-iters 10",
                             "any": "--repeats 3 --budget-mb 8 --max-iters 50"}),
         ranks={"quick": "largest", "any": "each"}, timeout=600),
    # The torch backend against raw mpi4py on the same buffers, rounds alternated
    # (per-call overhead and throughput ratio; the targets are on shm).
    Spec("backend-n{n}-{link}{rpn}", "perf.bench.backend", ("collectives",),
         "--worker --sizes {sizes} {timing}",
         values=dict(sizes={"tiny": "1k,64k", "any": "1k,4k,64k,1m,4m"},
                     timing={"tiny": "--rounds 2 --warmup 1 --budget-mb 0.5",
                             "any": "--rounds 9"}),
         links="shm", timeout=900),
    # Sparse and quantized allreduce against dense: one job per link and world size,
    # launched by the benchmark itself.
    Spec("sparse", "perf.bench.sparse", ("quick", "sparse"),
         "--sizes {sizes} --densities {densities} --world-sizes {world_sizes} --links {links} "
         "--algorithms {algorithms} --iters {iters} --out {out}/sparse",
         values=dict(sizes={"tiny": "16K", "quick": "1M", "full": "256K,1M"},
                     densities={"tiny": "0.01", "quick": "0.01", "any": "0.001,0.01"},
                     world_sizes={"tiny": "{largest}", "quick": "{largest}", "any": "{nprocs}"},
                     algorithms={"tiny": "dense,spardl", "quick": "dense,spardl,topka,quant8",
                                 "any": "dense,spardl,spardl2,topka,gtopk,quant8,quant1"},
                     iters={"tiny": "2", "any": "3"}),
         ranks="largest", links={"quick": "shaped-or-all", "any": "all"}, launch="driver",
         timeout={"tiny": 600, "quick": 600, "any": 1800}),
    # The compression kernels, one process.
    Spec("kernels", "perf.bench.kernels", ("quick", "kernels"), "{sizes}",
         values=dict(sizes={"tiny": "--sizes 4k --densities 0.01 --repeat 1",
                            "quick": "--quick", "any": ""}),
         ranks="one", links="local", launch="process", timeout=300),
    # Exposed communication of DDP, ZeRO-1, DPU, ACCO and CDP.
    Spec("overlap", "perf.bench.overlap", ("train",),
         "--nprocs {largest} --links {links_spaced} --out {out}/overlap {extra}",
         values=dict(extra={"tiny": "--steps 2 --methods ddp zero1 --no-memory", "any": ""}),
         ranks="largest", links="all", launch="folder", timeout=1800),
    # Every method of `python -m commrt.train` on one link: time to target loss.
    Spec("train-n{n}-{link}", "perf.bench.train_bench", ("train",), "{steps} {methods}",
         values=dict(steps={"tiny": "--tiny", "any": "--steps {train_steps}"}),
         ranks="largest", links="shaped", launch="train", timeout=5400),
    # DDP against the hybrid methods (DeMo, FlexDeMo, EDiT, A-EDiT) on two-tier nodes:
    # shm inside a node, the shaped link between (needs an even world size).
    Spec("methods-hybrid", "perf.bench.methods", ("train",),
         "--out {out}/methods --link {link} --nprocs {largest} "
         "--ranks-per-node {hybrid_rpn} --steps {train_steps}",
         ranks="largest", links="shaped", launch="folder", timeout=3600, needs="shaped-even"),
)


@dataclass
class Job:
    """One benchmark launch. `module` runs as ``python -m module *args --json OUT``."""

    name: str
    module: str
    nprocs: int
    link: str = "shm"
    args: list[str] = field(default_factory=list)
    ranks_per_node: int | None = None
    mpi: bool = True            # False: one plain process (see LAUNCHES)
    timeout: float = 300.0
    profile: bool = False       # py-spy on every rank (--profile)
    driver: bool = False        # a script that launches its own mpirun jobs
    kind: str = "bench"         # "bench": JSON records; "train": perf/bench/train_bench.py


def _pick(table: str | float | Mapping, cases: Sequence[str]) -> Any:
    """The value of the first case `table` gives ({case: value}), or `table` itself."""
    if not isinstance(table, Mapping):
        return table
    for case in cases:
        if case in table:
            return table[case]
    raise KeyError(f"no value for any of the cases {list(cases)} in {dict(table)}")


def build_jobs(suite: str, links: list[str], nprocs: list[int], tiny: bool,
               ranks_per_node: int | None, holdout_links: Sequence[str] = (),
               train_methods: str | None = None, train_steps: int = 60) -> list[Job]:
    """The jobs of a suite over the given links and world sizes, in the order of SPECS.
    The raw-MPI sweep also runs over `holdout_links`, which the α–β model never fits:
    it predicts them. `ranks_per_node` (two-tier nodes) applies on shaped links to
    world sizes it divides."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}: choose from {', '.join(SUITES)}")
    largest = max(nprocs)
    shaped = [lk for lk in links if lk != "shm"]
    size_case = ["tiny"] * tiny + ["quick" if suite == "quick" else "full", "any"]

    def rpn_for(link: str, n: int) -> int | None:
        if link == "shm" or ranks_per_node is None:
            return None
        return ranks_per_node if n % ranks_per_node == 0 else None

    run = dict(largest=largest, nprocs=",".join(map(str, nprocs)), train_steps=train_steps,
               hybrid_rpn=ranks_per_node or largest // 2, out="{out}",
               methods=f"--methods {train_methods}" if train_methods else "")
    jobs: list[Job] = []
    for spec in SPECS:
        if suite != "all" and suite not in spec.suites:
            continue
        if spec.needs == "shaped-even" and (tiny or largest % 2 or not shaped):
            continue
        link_rule = _pick(spec.links, size_case)
        job_links: list[str] = {
            "each": links, "each+holdout": [*links, *holdout_links],
            "shm": ["shm"] if "shm" in links else [], "local": ["shm"],
            "shaped": [shaped[0] if shaped else "shm"],
            "all": [",".join(links)],
            "shaped-or-all": [",".join(shaped or links)],
        }[link_rule]
        ranks = {"each": nprocs, "largest": [largest], "one": [1]}[_pick(spec.ranks, size_case)]
        for link in job_links:
            for n in ranks:
                cases = ["smallest"] * (spec.ranks == "each" and n == min(nprocs)) + size_case
                rpn = rpn_for(link, n) if "," not in link else None
                context = dict(run, n=n, link=link, links=link,
                               links_spaced=" ".join(link.split(",")),
                               rpn=f"-{rpn}pn" if rpn else "")
                values = {k: _pick(v, cases).format(**context) for k, v in spec.values.items()}
                launch = LAUNCHES[spec.launch]
                jobs.append(Job(
                    spec.name.format(**context), spec.module, n, link,
                    shlex.split(spec.flags.format(**context, **values)),
                    # Drivers started on "all" links launch their own two-tier jobs, if any.
                    ranks_per_node=rpn if launch["mpi"] or launch["kind"] == "train" else None,
                    timeout=float(_pick(spec.timeout, cases)), **launch))
    return jobs
