"""commrt.optim.registry: every registered method builds by name, steps, and keeps the
TrainingMethod contract (synchronize leaves the replicas equal, close is idempotent, stats
is a dict); MethodOptions' defaults are commrt.train's flag defaults.

One launch on 2 ranks over the commrt backend; each check is its own test."""
import math

import pytest
from harness import assert_check, checks_fixture, generator, run_checks

# The registry's names, written out (an independent list: a method added or dropped there
# must be added or dropped here, and in commrt.train's --help, on purpose).
NAMES = ["ddp", "spardl", "topka", "gtopk", "quant8", "quant1", "demo", "flexdemo", "edit",
         "aedit", "acco", "zero1", "dpu", "cdp"]
# Settings that make two steps on 2 ranks exercise each method: emulated nodes of one rank
# (flexdemo, edit, aedit cross them), EDiT's local steps after one warm-up step, a fixed
# micro-batch count for the overlap methods.
OPTIONS = {"flexdemo": {"ranks_per_node": 1},
           "edit": {"ranks_per_node": 1, "warmup_steps": 1, "sync_interval": 4},
           "aedit": {"ranks_per_node": 1, "warmup_steps": 1, "sync_seconds": 30.0},
           "acco": {"micro_batches": 1}, "dpu": {"micro_batches": 1}}
VOCAB, BLOCK = 64, 16


def _flat(model):
    import torch

    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _build_step_sync(seed: int) -> None:
    import torch

    from commrt import transports as T
    from commrt.model import build_gpt, lm_loss, preset
    from commrt.optim.base import TrainingMethod
    from commrt.optim.registry import METHODS, MethodOptions, build_method

    comm = T.world()
    config = preset("tiny", n_layer=2, n_embd=32, n_head=2, block_size=BLOCK, vocab_size=VOCAB)
    assert list(METHODS) == NAMES, list(METHODS)
    for name in NAMES:
        model = build_gpt(config, seed=seed % 1000)
        before = _flat(model).clone()
        method = build_method(name, model, MethodOptions(lr=1e-2, **OPTIONS.get(name, {})))
        assert isinstance(method, TrainingMethod), (name, type(method))
        g = generator(seed, name, comm.rank)

        def next_batch(g=g):
            tokens = torch.randint(0, VOCAB, (2, BLOCK + 1), generator=g)
            return tokens[:, :-1], tokens[:, 1:]

        losses = [method.step(next_batch, lm_loss) for _ in range(2)]
        # random tokens: the loss of a fresh model is near ln(vocab)
        assert all(abs(loss - math.log(VOCAB)) < 1.0 for loss in losses), (name, losses)
        method.synchronize()
        after = _flat(method.model)
        assert not torch.equal(after, before), f"{name}: two steps left the model unchanged"
        replicas = comm.allgather_object(after)
        assert all(torch.equal(r, replicas[0]) for r in replicas), \
            f"{name}: replicas differ after synchronize()"
        assert isinstance(method.stats(), dict), name
        method.close()
        method.close()   # idempotent
        comm.barrier()


def _rejects_bad_options(seed: int) -> None:
    from commrt.model import build_gpt, preset
    from commrt.optim.registry import MethodOptions, build_method

    config = preset("tiny", n_layer=1, n_embd=32, n_head=2, block_size=BLOCK, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="stages"):
        build_method("cdp", build_gpt(config, seed=seed % 1000), MethodOptions(stages=9))


CHECKS = {"every_method_builds_steps_and_syncs": _build_step_sync,
          "bad_options_raise_value_error": _rejects_bad_options}


def _registry_worker(seed: int) -> None:
    from commrt import transports as T
    from commrt.training.distributed import init_torch_distributed

    comm = T.world()
    init_torch_distributed("commrt", comm)   # DDP's methods take the default group
    run_checks(CHECKS, seed, rank=comm.rank)


launch = checks_fixture(_registry_worker, [2], timeout=400)


@pytest.mark.parametrize("check", list(CHECKS))
def test_registry(launch, check):
    assert_check(launch, check)


def test_registry_option_defaults_are_the_cli_defaults():
    """A flag and the MethodOptions field of the same name default alike; every field
    except the few perf-only ones is a flag."""
    from dataclasses import fields

    from commrt.optim.registry import MethodOptions
    from commrt.training.cli import build_parser

    parsed = vars(build_parser().parse_args([]))
    perf_only = {"max_micro_batches", "sync_comm", "stagger"}
    for f in fields(MethodOptions):
        if f.name in perf_only:
            assert f.name not in parsed, f.name
            continue
        assert f.name in parsed, f"MethodOptions.{f.name} has no flag"
        assert parsed[f.name] == f.default, (f.name, parsed[f.name], f.default)
