"""What the compiler did, pass by pass: the FX graph before and after each pass and their diff (what
`helix graph` prints, and what ``tests/test_golden.py`` compares).

    title, secs = passes_of("llama", Layout(kvp=2, tpa=2))     # a tiny random llama: no weights needed
    print(report_text(secs))

Contract
    ``capture(model, layout, phase)`` traces ``model`` (prefill, or prefill then one decode step) inside
    ``fake_world(rank, layout.world_size)`` (a process group without communication) and returns the backend's ``Compiled`` (``backend.run_passes``)
    of the last graph; ``write_stages`` of it is the golden-fixture format (``tests/test_golden.py`` calls the same
    two functions). ``passes_of`` gives, for each pass in pipeline order (capture, detect, plan, partition,
    schedule), what it produced: the captured graph, the regions, the placements, and the unified diff of the
    graph text before -> after each graph-changing pass; ``report_html`` makes one self-contained page of it.
    Parameters are virtual (zero-storage, global-shaped): a model of any size is traced without its weights.
"""

from __future__ import annotations

import contextlib
import difflib
import html
from pathlib import Path

PASSES = ("capture", "detect", "plan", "partition", "schedule")
GRAPH_BEFORE = {"partition": "capture", "schedule": "partition"}  # graph-changing passes and their input
TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=256)

# -- building and tracing -----------------------------------------------------------------------------------------
def tiny_config(model_type: str):
    """A two-layer config of ``model_type`` (8 query heads, 4 KV heads, hidden 64), as the tests use."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        close = difflib.get_close_matches(model_type, CONFIG_MAPPING_NAMES, n=3)
        raise ValueError(f"{model_type!r} is neither a directory nor a transformers model_type"
                         + (f" (did you mean {', '.join(close)}?)" if close else ""))
    extra = {"sliding_window": None} if model_type in ("mistral", "qwen2", "qwen3") else {}
    config = AutoConfig.for_model(model_type, **{**TINY, **extra})
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id"):  # defaults of a real vocabulary (e.g. 32000)
        if isinstance(getattr(config, attr, None), int) and getattr(config, attr) >= TINY["vocab_size"]:
            setattr(config, attr, TINY["vocab_size"] - 1)
    return config


def virtual_model(config):
    """``AutoModelForCausalLM`` of ``config`` whose parameters are virtual: traceable, no memory, never run."""
    import torch
    from accelerate import init_empty_weights

    from . import shards
    from .loading import model_from_config

    with init_empty_weights(include_buffers=False):
        model = model_from_config(config)
    dtype = getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    for name, p in list(model.named_parameters()):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        module._parameters[attr] = torch.nn.Parameter(shards.virtual(p.shape, dtype), requires_grad=False)
    if getattr(config, "tie_word_embeddings", False):
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    return model.eval()


def load_model(spec: str):
    from transformers import AutoConfig

    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"{spec}: no config.json in this directory")
        return virtual_model(AutoConfig.from_pretrained(path))
    return virtual_model(tiny_config(spec))


@contextlib.contextmanager
def fake_world(rank: int, world: int):
    """A fake process group (no communication) in which this process is ``rank`` of ``world``: enough to trace,
    partition and print graphs with collectives. Graph text resolves group names, so keep it open until printed."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def capture(model, layout, phase: str = "decode", batch: int = 2, prompt_len: int = 5, max_cache_len: int = 32):
    """Trace ``model`` and run the passes as this rank of ``layout``; returns the last graph's ``Compiled``.

    Needs an initialised process group of ``layout.world_size`` ranks (``fake_world``). ``phase`` "decode"
    traces the prefill and then one q_len=1 step (the decode graph is returned); "prefill" only the prefill.
    """
    import torch

    from .backend import run_passes
    from .cache import StaticCache

    torch._dynamo.reset()
    cache = StaticCache(model.config, batch, max_cache_len, layout)
    seen = []

    def backend(gm, example_inputs, **_):
        seen.append(run_passes(gm, example_inputs, layout))
        outputs = gm.graph.output_node().args[0]
        return lambda *args: [torch.zeros(()) for _ in outputs]  # traced only, never run

    compiled = torch.compile(model, backend=backend, fullgraph=True)
    ids = torch.zeros((batch, prompt_len), dtype=torch.long)
    try:
        with torch.no_grad():
            compiled(input_ids=ids, past_key_values=cache)
            if phase == "decode":
                compiled(input_ids=ids[:, :1], past_key_values=cache)
    except Exception as e:  # Dynamo wraps the backend's refusal; the user needs the refusal
        inner = getattr(e, "inner_exception", None)
        if isinstance(inner, (ValueError, NotImplementedError)):
            raise ValueError(str(inner)) from None
        raise
    return seen[-1]


# -- reporting ------------------------------------------------------------------------------------------------------
def sections(done) -> list[tuple[str, str, str, str]]:
    """(pass, what it produced, full text after it, diff against its input graph or '') in pipeline order."""
    from .graph_text import graph_text

    text = {name: graph_text(g) for name, g in done.stages.items()}
    out = [("capture", "the global graph from Dynamo", text["capture"], ""),
           ("detect", "regions (the graph is unchanged)", done.regions.describe() + "\n", ""),
           ("plan", "placements of the graph inputs (the graph is unchanged)", done.plan.to_json() + "\n", "")]
    for name, what in (("partition", "global graph -> this rank's local graph"), ("schedule", "HOP-B")):
        before = GRAPH_BEFORE[name]
        diff = "".join(difflib.unified_diff(text[before].splitlines(True), text[name].splitlines(True),
                                            f"{before}.txt", f"{name}.txt"))
        out.append((name, what, text[name], diff or f"(no change from {before})\n"))
    return out


def report_text(secs, full: bool = False) -> str:
    parts = []
    for name, what, after, diff in secs:
        parts.append(f"== {name}: {what}\n")
        parts.append(after if (not diff or full) else diff)
    return "".join(parts)


def report_html(secs, title: str) -> str:
    """One self-contained page (inline CSS, no scripts): each pass's diff, and its full text folded."""
    def pre(text: str, diff: bool) -> str:
        if not diff:
            return f"<pre>{html.escape(text)}</pre>"
        rows = []
        for line in text.splitlines():
            cls = {"+": "add", "-": "del", "@": "hunk"}.get(line[:1], "") if not line.startswith(("+++", "---")) else "file"
            rows.append(f'<span class="{cls}">{html.escape(line)}</span>')
        return "<pre>" + "\n".join(rows) + "</pre>"

    body = [f"<h1>{html.escape(title)}</h1>"]
    for name, what, after, diff in secs:
        body.append(f'<h2 id="{name}">{name}: {html.escape(what)}</h2>')
        if diff:
            body.append(pre(diff, True))
            body.append(f"<details><summary>{name}.txt in full</summary>{pre(after, False)}</details>")
        else:
            body.append(pre(after, False))
    nav = " | ".join(f'<a href="#{s[0]}">{s[0]}</a>' for s in secs)
    style = ("body{font-family:sans-serif;margin:2em}pre{background:#f6f8fa;padding:1em;overflow-x:auto;"
             "font-size:12px}.add{background:#e6ffec;display:block}.del{background:#ffebe9;display:block}"
             ".hunk{color:#0550ae;display:block}.file{color:#57606a;display:block}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><p>{nav}</p>{''.join(body)}</body></html>\n")


def passes_of(spec: str, layout, rank: int = 0, phase: str = "decode", batch: int = 2, prompt_len: int = 5,
              out: str | None = None):
    """(title, ``sections``) of ``spec`` (a model_type or a checkpoint directory) as ``rank`` of ``layout``; with
    ``out``, the fixture files are written there too (``backend.write_stages``)."""
    from .backend import write_stages

    if not 0 <= rank < layout.world_size:
        raise ValueError(f"--rank {rank} is not one of the layout's {layout.world_size} ranks")
    model = load_model(spec)
    layout.validate(model.config.get_text_config(decoder=True))
    with fake_world(rank, layout.world_size):
        done = capture(model, layout, phase, batch, prompt_len, max_cache_len=max(32, prompt_len + 1))
        secs = sections(done)  # graph text resolves group names: inside the fake world
        if out:
            write_stages(Path(out), done)
    title = (f"helix graph {spec}: rank {rank} of kvp={layout.kvp} x tpa={layout.tpa}, {phase}, "
             f"kv_block={layout.kv_block}, hopb_chunks={layout.hopb_chunks}")
    return title, secs
