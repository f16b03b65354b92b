"""lowering/compile.py: the CUDA-graph bookkeeping of a compiled local program (what CPU can check: no capture)."""

import torch

from helix_compile.lowering import compile as lowering


class _Step:
    """GraphedStep's place in the bookkeeping, without capturing: counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


def test_graphs_per_integer_value_stay_bounded(monkeypatch):
    """An integer input that changes every call (the host cache length of MPT, GIT, TrOCR in decode) must not add
    one entry per step: at most MAX_GRAPHS values are kept, the last used; a value used again keeps its entry."""
    monkeypatch.setattr(lowering, "GraphedStep", _Step)
    program = lowering.Lowered.__new__(lowering.Lowered)  # the bookkeeping alone: no Inductor, no CUDA
    program.executor, program.cudagraphs, program.graphed = "inductor", True, lowering.OrderedDict()
    program.fn = lambda *args: (args[0],)
    x = torch.zeros(2)
    for length in range(1, 3 * lowering.MAX_GRAPHS):
        program([x, length])
        program([x, 0])  # a value used every other call keeps its graph (a prompt length that recurs)
        assert len(program.graphed) <= lowering.MAX_GRAPHS
    assert program.graphed[(0,)].calls == 3 * lowering.MAX_GRAPHS - 1
    assert (3 * lowering.MAX_GRAPHS - 1,) in program.graphed and (1,) not in program.graphed


def test_prefill_programs_are_told_from_decode_steps():
    """A program whose queries sit at more than one position (a prompt) is never captured in a CUDA graph: its
    attention reads the positions on the host (``lowering/prefill.py``). A decode step (one position) is."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from helix_compile import Layout, StaticCache
    from helix_compile.backend import run_passes
    from models import model, prompt

    layout, m = Layout(2, 1, kv_block=4), model("llama")
    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=2)
    try:
        torch._dynamo.reset()
        cache, seen = StaticCache(m.config, 2, 32, layout), []

        def backend(gm, example_inputs, **_):
            seen.append(lowering.is_prefill(run_passes(gm, example_inputs, layout).stages["schedule"]))
            return lambda *args: [torch.zeros(()) for _ in gm.graph.output_node().args[0]]

        step = torch.compile(m, backend=backend, fullgraph=True)
        step(input_ids=prompt(length=5), past_key_values=cache)
        step(input_ids=prompt(length=1), past_key_values=cache)
        assert seen == [True, False]
    finally:
        dist.destroy_process_group()
