"""`helix generate` as a user runs it: real processes (gloo), text identical to single-device transformers,
torchrun across two launchers, and the faults: a layout or world size other than the plan's, a corrupted shard,
a rank killed mid-generation, Ctrl-C."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cli_checkpoint import EOS, greedy_text, save
from distributed import free_port
from helix_compile.cli import main

ROOT = Path(__file__).parent.parent
PROMPT = "w1 w2 w3"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
       "PYTHONWARNINGS": "ignore"}
CLI = [sys.executable, "-m", "helix_compile.cli"]

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    ckpt = save(root / "hf", "llama")
    assert main(["convert", str(ckpt), "--kvp", "2", "--kv-block", "4", "-o", str(root / "out"), "--quiet"]) == 0
    return ckpt, root / "out"


def _run(args, timeout=600):
    return subprocess.run(CLI + args, capture_output=True, text=True, env=ENV, timeout=timeout, cwd=ROOT)


def test_sampling_equals_transformers_sampling_under_the_same_seed(tmp_path):
    """An HF directory (no conversion), tpa=2. The checkpoint's generation_config asks for sampling with top-k 5 and
    temperature 0.7; --top-p overrides what it leaves unset: the draws of transformers' generate(top_p=...) under
    the same seed, which applies the same generation_config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    ckpt = save(tmp_path / "hf", "llama", seed=5)
    GenerationConfig(do_sample=True, top_k=5, temperature=0.7, eos_token_id=EOS).save_pretrained(ckpt)
    done = _run(["generate", str(ckpt), "--kvp", "1", "--tpa", "2", "--prompt", PROMPT, "--max-new-tokens", "10",
                 "--top-p", "0.9", "--seed", "3", "--executor", "eager"])
    assert done.returncode == 0, done.stderr
    tok, m = AutoTokenizer.from_pretrained(ckpt), AutoModelForCausalLM.from_pretrained(ckpt).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    torch.manual_seed(3)
    ref = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, top_p=0.9)
    want = tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    assert done.stdout == want + "\n"
    assert want != greedy_text(ckpt, PROMPT, 10)  # it did sample


def test_bf16_checkpoint_batch_from_stdin_inductor(tmp_path):
    """A bf16 checkpoint (as released ones ship) in its own dtype through Inductor on 2 ranks; two prompts of
    different lengths from stdin as one left-padded batch: transformers' bf16 generate on the same batch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = save(tmp_path / "hf", "llama", seed=4, dtype=torch.bfloat16)
    prompts = ["w1 w2 w3 w4 w5", "w6 w7"]
    done = subprocess.run(CLI + ["generate", str(ckpt), "--kvp", "2", "--kv-block", "4", "--max-new-tokens", "8"],
                          input="\n".join(prompts) + "\n", capture_output=True, text=True, env=ENV, timeout=600,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "bfloat16 on cpu" in done.stderr and "2 prompt(s) of 5 tokens" in done.stderr
    tok = AutoTokenizer.from_pretrained(ckpt, padding_side="left")
    m = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = m.generate(**batch, max_new_tokens=8, do_sample=False)
    want = tok.batch_decode(ref[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert done.stdout == "".join(w + "\n\n" for w in want)
    assert "compile " in done.stderr and "prefill " in done.stderr and "peak memory per rank" in done.stderr
    assert "leaked" not in done.stderr and "Warning" not in done.stderr


def test_family_that_needs_generate_inputs(tmp_path):
    """OPT derives its positions from the cache's length when the call has no attention_mask: the command calls
    the model as transformers' generate does, so it traces and gives generate's text (kvp=2)."""
    ckpt = save(tmp_path / "hf", "opt", seed=2)
    done = _run(["generate", str(ckpt), "--kvp", "2", "--kv-block", "4", "--prompt", PROMPT, "--max-new-tokens", "8",
                 "--executor", "eager"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == greedy_text(ckpt, PROMPT, 8)


def test_torchrun_two_nodes_loopback(converted):
    """Two torchrun launchers (--nnodes 2, one rank each) meet through a c10d rendezvous on 127.0.0.1."""
    ckpt, out = converted
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "helix-test",
           "-m", "helix_compile.cli", "generate", str(out), "--prompt", PROMPT, "--max-new-tokens", "10",
           "--executor", "eager"]
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
             for _ in range(2)]
    results = [p.communicate(timeout=600) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], [r[1][-3000:] for r in results]
    texts = [r[0].strip() for r in results]
    assert sorted(texts) == ["", greedy_text(ckpt, PROMPT, 10)]  # rank 0's node streams the text, the other none


@pytest.fixture(scope="module")
def broken(tmp_path_factory, converted):
    """Checkpoints a user may have: a copy with one flipped byte, a truncated file, no config, no tokenizer, a
    GPT-2 with 16 positions."""
    ckpt, good = converted
    root = tmp_path_factory.mktemp("broken")
    flipped = shutil.copytree(good, root / "flipped")
    data = bytearray((flipped / "rank1.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x01
    (flipped / "rank1.safetensors").write_bytes(bytes(data))
    truncated = shutil.copytree(ckpt, root / "truncated")
    (truncated / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes()[:-64])
    no_config = shutil.copytree(ckpt, root / "no-config")
    (no_config / "config.json").unlink()
    no_tokenizer = shutil.copytree(ckpt, root / "no-tokenizer")
    for f in no_tokenizer.glob("tokenizer*"):
        f.unlink()
    return {"good": good, "hf": ckpt, "flipped": flipped, "truncated": truncated, "no-config": no_config,
            "no-tokenizer": no_tokenizer, "gpt2": save(root / "gpt2", "gpt2", max_position_embeddings=16),
            "two-heads": save(root / "two-heads", "llama", num_attention_heads=2, num_key_value_heads=2)}


LONG = " ".join(f"w{i}" for i in range(12))
BAD_INPUT = [  # (checkpoint, arguments, the one line that names the problem)
    ("gpt2", ["--kvp", "1", "--prompt", LONG, "--max-new-tokens", "8"],
     "the prompt (12 tokens) plus --max-new-tokens 8 is 20 positions, but gpt2 has 16"),
    ("hf", ["--kvp", "1", "--tpa", "3", "--prompt", PROMPT], "tpa=3"),
    ("two-heads", ["--kvp", "3", "--prompt", PROMPT], "kvp=3 exceeds the 2 query heads of a TPA slice"),
    ("hf", ["--kvp", "2", "--prompt", PROMPT, "--nproc", "3"], "kvp=2 x tpa=1 needs 2 ranks but --nproc asks for 3"),
    ("hf", ["--kvp", "2", "--prompt", PROMPT, "--max-new-tokens", "-3"], "--max-new-tokens: must be at least 1, got -3"),
    ("hf", ["--kvp", "2", "--prompt", PROMPT, "--max-new-tokens", "0"], "--max-new-tokens: must be at least 1, got 0"),
    ("no-config", ["--kvp", "2", "--prompt", PROMPT], "has no config.json"),
    ("no-tokenizer", ["--kvp", "2", "--prompt", PROMPT], "has no tokenizer"),
    ("truncated", ["--kvp", "2", "--prompt", PROMPT], "model.safetensors is truncated or corrupted"),
    ("flipped", ["--prompt", PROMPT], "rank1.safetensors is corrupted"),
    ("hf", ["--layout", "kvp=2,tpa=1", "--kvp", "1", "--prompt", PROMPT],
     "--layout kvp=2,tpa=1 and --kvp 1 both set the layout"),
    ("hf", ["--kvp", "2", "--prompt", "zzz", "--chat"], "has no chat template"),
    ("hf", ["--kvp", "2", "--prompt", PROMPT, "--prompt-file", "x.txt"], "--prompt and --prompt-file both"),
    ("good", ["--nproc", "4", "--prompt", PROMPT], "was converted for 2 ranks (kvp=2 tpa=1) but --nproc asks for 4"),
    ("good", ["--tpa", "2", "--kvp", "1", "--prompt", PROMPT],
     "converted for kvp=2 tpa=1 tpf=2 ep=1 (2 ranks) but the layout asked for is kvp=1 tpa=2"),
]


@pytest.mark.parametrize("which, args, message", BAD_INPUT, ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(BAD_INPUT)])
def test_bad_input_is_one_line_before_any_rank_starts(broken, which, args, message, monkeypatch, capsys):
    import helix_compile.generation as generation

    monkeypatch.setattr(generation, "launch_ranks", lambda *a: pytest.fail("a rank was started"))
    monkeypatch.setattr(generation, "visible_gpus", lambda: 0)
    code = main(["generate", str(broken[which]), "--device", "cpu", *args])  # argparse's own checks return 2 too
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert message in err[-1], err
    assert "Traceback" not in "\n".join(err)


class _Launcher:
    """`helix generate` started in the background, its stdout and stderr collected as they come."""

    def __init__(self, args, prefix=CLI):
        # Ctrl-C's default action, as in a terminal: a test run started in the background by a non-interactive shell
        # inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler in the launcher
        self.proc = subprocess.Popen(prefix + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=ENV, cwd=ROOT,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.out, self.err = [], []
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=lambda s=stream, k=sink: k.extend(iter(lambda: s.read(1), "")), daemon=True).start()

    def wait_for_text(self, timeout=600):
        deadline = time.monotonic() + timeout
        while "".join(self.out).count(" ") < 2:  # two streamed words: decoding is under way
            assert self.proc.poll() is None, "".join(self.err)
            assert time.monotonic() < deadline, "no text streamed"
            time.sleep(0.1)

    def ranks(self):
        """PIDs of the spawned rank processes (children running multiprocessing's spawn_main)."""
        return self.children("spawn_main")

    def descendants(self):
        from helix_compile.launch import descendants

        return descendants(self.proc.pid)

    def children(self, marker):
        pids = []
        for entry in Path("/proc").iterdir():
            try:
                stat = (entry / "stat").read_text()
                cmd = (entry / "cmdline").read_bytes().decode()
            except (OSError, ValueError):
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid and marker in cmd:
                pids.append(int(entry.name))
        return pids


def _gone(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


# 60 tokens at 0.5 s apart: the kill / Ctrl-C lands mid-generation even when a loaded machine reads the stream late
GENERATE_SLOWLY = ["--prompt", PROMPT, "--max-new-tokens", "60", "--executor", "eager", "--step-delay", "0.5"]


def test_rank_killed_mid_generation(converted):
    _, out = converted
    run = _Launcher(["generate", str(out), *GENERATE_SLOWLY])
    run.wait_for_text()
    ranks = run.ranks()
    assert len(ranks) == 2
    t0 = time.monotonic()
    os.kill(ranks[1], signal.SIGKILL)
    code = run.proc.wait(timeout=60)
    elapsed = time.monotonic() - t0
    err = "".join(run.err)
    assert code == 1 and elapsed < 60, (code, elapsed, err)
    assert "ended with signal SIGKILL; stopped the other 1 rank(s)" in err, err
    assert all(_gone(p) for p in ranks)


def test_ctrl_c_stops_every_rank(converted):
    _, out = converted
    run = _Launcher(["generate", str(out), *GENERATE_SLOWLY])
    run.wait_for_text()
    ranks = run.ranks()
    run.proc.send_signal(signal.SIGINT)
    code = run.proc.wait(timeout=60)
    assert code == 130, "".join(run.err)
    assert "interrupted" in "".join(run.err)
    assert all(_gone(p) for p in ranks)


def test_ctrl_c_while_compiling_leaves_no_process(converted):
    """Ctrl-C during the warm-up compile: every rank and every process below it (compile workers, multiprocessing's
    resource tracker) is gone, and nothing is reported as leaked."""
    _, out = converted
    run = _Launcher(["generate", str(out), "--prompt", PROMPT])
    deadline = time.monotonic() + 300
    while "compiling" not in "".join(run.err):
        assert run.proc.poll() is None, "".join(run.err)
        assert time.monotonic() < deadline, "".join(run.err)
        time.sleep(0.1)
    time.sleep(3)
    below = run.descendants()
    assert len(run.ranks()) == 2
    run.proc.send_signal(signal.SIGINT)
    assert run.proc.wait(timeout=60) == 130, "".join(run.err)
    time.sleep(1)
    assert [p for p in below if not _gone(p)] == []
    assert "leaked" not in "".join(run.err)


def test_rank_killed_across_nodes(converted):
    """Two torchrun launchers; the rank on the node that is not streaming is killed: the other rank notices the
    broken connection in its next collective (or by its watchdog) and exits with a message, and so do both
    launchers, within 60 s. Static rendezvous puts the store with node 0's launcher (rank 0, the one streaming),
    as a cluster's endpoint on node 0 does; were the store's own host killed, the survivor's launcher would end
    its rank on torchrun's rendezvous error before the rank could say anything."""
    _, out = converted
    port = free_port()
    nodes = [_Launcher([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                        "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
                        "-m", "helix_compile.cli", "generate", str(out), *GENERATE_SLOWLY, "--timeout", "45"],
                       prefix=[]) for node in range(2)]
    deadline = time.monotonic() + 600
    while not any("".join(n.out).count(" ") >= 2 for n in nodes):
        assert all(n.proc.poll() is None for n in nodes), ["".join(n.err)[-2000:] for n in nodes]
        assert time.monotonic() < deadline, "no text streamed"
        time.sleep(0.1)
    streaming, quiet = nodes
    assert "".join(quiet.out).count(" ") < 2, "".join(quiet.out)
    (worker,) = quiet.children("helix_compile.cli")
    t0 = time.monotonic()
    os.kill(worker, signal.SIGKILL)
    codes = [n.proc.wait(timeout=60) for n in nodes]
    assert time.monotonic() - t0 < 60 and all(c != 0 for c in codes), codes
    err = "".join(streaming.err)
    assert "helix generate: rank 0: " in err and ("a collective failed" in err or "no progress for" in err), err[-3000:]


def test_gguf_file_generates_like_transformers(tmp_path):
    """The launcher's path end to end: a GGUF given to `helix generate` is de-quantised and converted once (into
    a temp dir removed afterwards), the tokenizer comes from the GGUF, 2 ranks are spawned; the greedy text equals
    transformers' on the same file. (The torchrun test checks a converted HF checkpoint the same way.)"""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cli_checkpoint import write_gguf

    gguf_file = write_gguf(tmp_path / "tiny.gguf")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    done = subprocess.run(CLI + ["generate", str(gguf_file), "--kvp", "2", "--prompt", "w1 w2 w3",
                                 "--max-new-tokens", "8", "--executor", "eager"], capture_output=True, text=True,
                          env={**ENV, "TMPDIR": str(scratch)}, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    m = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    ids = tok("w1 w2 w3", return_tensors="pt").input_ids
    ref = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    want = tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    assert len(want) >= 5 and done.stdout == want + "\n"  # stdout is the generated text only
    assert "tiny.gguf: 2 rank(s), kvp=2 tpa=1" in done.stderr  # the file the user gave, not the temporary conversion
    assert "ms/token" in done.stderr and "tokens/s" in done.stderr
    assert [p.name for p in scratch.iterdir() if p.name.startswith("helix-gguf-")] == []


def _transformers_text(ckpt, prompts, dtype, new):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt, padding_side="left")
    m = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).eval()
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = m.generate(**batch, max_new_tokens=new, do_sample=False)
    return "".join(t + "\n\n" for t in tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True))


def test_bf16_moe_mla_checkpoint_convert_and_generate(tmp_path):
    """DeepSeek-V3 (MLA attention, routed and shared experts) saved in bf16, a left-padded batch of two prompts:
    `helix generate` on the HF directory in its own dtype through Inductor (kvp=2, ep=2) runs; `helix convert
    --kvp 2 --ep 2` then `helix generate --dtype float32` gives transformers' fp32 text on the same weights."""
    import torch

    ckpt = save(tmp_path / "hf", "deepseek_v3", seed=2, dtype=torch.bfloat16)
    prompts = ["--prompt", "w1 w2 w3 w4 w5", "--prompt", "w6 w7"]
    done = _run(["generate", str(ckpt), "--kvp", "2", "--ep", "2", "--kv-block", "4", *prompts, "--max-new-tokens", "6"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kvp=2 tpa=1 tpf=1 ep=2" in done.stderr and "bfloat16 on cpu" in done.stderr
    assert done.stdout.count("\n\n") == 2
    out = tmp_path / "converted"
    assert main(["convert", str(ckpt), "--kvp", "2", "--ep", "2", "--kv-block", "4", "-o", str(out), "--quiet"]) == 0
    done = _run(["generate", str(out), *prompts, "--max-new-tokens", "6", "--dtype", "float32", "--executor", "eager"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == _transformers_text(ckpt, ["w1 w2 w3 w4 w5", "w6 w7"], torch.float32, 6)
