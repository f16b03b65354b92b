"""The README's Python quickstart, executed as written on 2 CPU ranks (torchrun, gloo) over a bf16 checkpoint:
it prints what transformers' own bf16 generate prints for the same left-padded batch. (tests/gpu/test_front_door.py
runs it on GPUs.)"""

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from cli_checkpoint import save

ROOT = Path(__file__).parent.parent


def readme_snippet(heading: str = "Python quickstart") -> str:
    """The fenced python block under the README heading ``heading``, verbatim."""
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^#+ {heading}.*?```python\n(.*?)```", text, flags=re.S | re.M)
    assert match, f"README.md has no ```python block under a '{heading}' heading"
    return match.group(1)


def test_python_quickstart_as_written(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    snippet = readme_snippet()
    save(tmp_path / "ckpt", "llama", seed=3, dtype=torch.bfloat16)
    (tmp_path / "quickstart.py").write_text(snippet)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "quickstart.py"],
                          capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    prompts = re.findall(r'"([^"]*)"', re.search(r"tokenizer\(\[(.*?)\]", snippet).group(1))
    new = int(re.search(r"max_new_tokens=(\d+)", snippet).group(1))
    tok = AutoTokenizer.from_pretrained(tmp_path / "ckpt", padding_side="left")
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16).eval()
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = m.generate(**batch, max_new_tokens=new, do_sample=False)
    want = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert done.stdout.strip() == repr(want)
