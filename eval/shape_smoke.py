"""The whole pipeline at Llama-3-8B's layer shapes on a CPU, each stage timed and its peak memory measured.

    python eval/shape_smoke.py /work/runs/i36/smoke --layers 2

A Llama-3-8B-shaped checkpoint (GQA 32/8, hidden 4096, MLP 14336, vocab 128256; random bf16 weights,
`--layers` decoder layers) goes through: a search (2 steps, 128 tokens, pruning from the files), `dms-llm
prune` of its plan from the files, reloading the pruned checkpoint both ways (dms_llm registered; and
`trust_remote_code=True` in a process that never imports dms_llm) with equal logits, two perplexity windows,
and a GGUF export (f32) that llama.cpp loads, whose logits must match transformers' within `--atol` (0.05).
Every stage runs in its own process under `/usr/bin/time -v`, so its peak resident memory is its own; the
table goes to WORK/shape_smoke.json and .md. Exit status 1 when a check fails.

The search computes in fp32 (`--dtype float32`): on this machine's CPU build of torch, a bf16 matrix
product whose second operand is row-major (the input gradient of every frozen projection) falls back to a
scalar kernel, 460x slower than with the operand transposed (docs/RESULTS.md 9), so two bf16 steps at these
shapes would take hours. The files stay bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PROBE_TOKENS = 64


def _probe_ids(vocab: int):
    import torch

    return torch.randint(3, min(vocab, 1000), (1, PROBE_TOKENS), generator=torch.Generator().manual_seed(0))


def stage_reload(pruned: str, out: str, remote: bool) -> None:
    """Load the pruned checkpoint (through dms_llm's registration, or trust_remote_code without dms_llm)
    and save its logits on the probe."""
    import torch
    from transformers import AutoModelForCausalLM

    if remote:
        if "dms_llm" in sys.modules:
            raise RuntimeError("the remote-code reload must run without dms_llm imported")
        model = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32, trust_remote_code=True)
    else:
        import dms_llm  # noqa: F401  (registers dms_llama with the Auto classes)

        model = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32)
    with torch.no_grad():
        logits = model.eval()(input_ids=_probe_ids(model.config.vocab_size)).logits[0]
    torch.save({"logits": logits, "class": type(model).__name__}, out)


def stage_ppl(pruned: str, corpus: str, out: str) -> None:
    """Two 128-token perplexity windows of the pruned model on the corpus."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import dms_llm  # noqa: F401
    from dms_llm.evaluation.perplexity import perplexity_of_ids

    tok = AutoTokenizer.from_pretrained(pruned)
    with open(corpus) as f:
        text = " ".join(json.loads(line)["text"] for line in f)
    ids = torch.tensor(tok(text)["input_ids"][: 2 * 128 + 1])
    model = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32).eval()
    result = perplexity_of_ids(model, ids, seq_len=128, max_windows=2, progress=False)
    with open(out, "w") as f:
        json.dump({k: v for k, v in result.items() if isinstance(v, (int, float, str))}, f)


def stage_llamacpp(gguf: str, out: str) -> None:
    """llama.cpp's logits of the GGUF file on the probe."""
    import torch

    from dms_llm.export import llamacpp

    llm = llamacpp.load(gguf, n_ctx=PROBE_TOKENS, threads=1)
    ids = _probe_ids(llm.n_vocab())[0].tolist()
    torch.save({"logits": torch.from_numpy(llamacpp.logits(llm, ids))}, out)


def write_bpe_tokenizer(folder: str, corpus: str) -> None:
    """Replace the checkpoint's word-level tokenizer with a byte-level BPE (GPT-2 pre-tokenizer) of 1,000
    tokens learnt from the corpus: the GGUF export, like llama.cpp, handles BPE tokenizers only. Ids 0/1/2
    are unk/bos/eos, as in the config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    with open(corpus) as f:
        tok.train_from_iterator([json.loads(line)["text"] for line in f], trainer)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.exists(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(folder)


def _timed(name: str, cmd: list[str], work: str, rows: list, env: dict) -> None:
    """Run `cmd` under /usr/bin/time -v; record wall time and peak RSS; stop on failure."""
    report = os.path.join(work, f"time-{name}.txt")
    start = time.time()
    proc = subprocess.run(["/usr/bin/time", "-v", "-o", report, *cmd], env=env, capture_output=True, text=True)
    wall = time.time() - start
    with open(report) as f:
        peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", f.read()).group(1))
    rows.append({"stage": name, "wall_s": round(wall, 1), "peak_rss_gib": round(peak_kib / 2**20, 2),
                 "command": " ".join(cmd[1:] if cmd[0] == sys.executable else cmd)})
    print(f"{name}: {wall:.1f} s, peak RSS {peak_kib / 2**20:.2f} GiB", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"stage {name} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def run(work: str, layers: int, atol: float) -> int:
    import torch

    if os.path.exists(work):
        raise SystemExit(f"{work} exists; choose a new folder")
    os.makedirs(work)
    py = sys.executable
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    model, search, pruned = (os.path.join(work, n) for n in ("model", "search", "pruned"))
    corpus, gguf = os.path.join(work, "corpus.jsonl"), os.path.join(work, "pruned-f32.gguf")
    with open(corpus, "w") as f:  # words of the synthetic tokenizer, so that tokens vary
        g = torch.Generator().manual_seed(0)
        for _ in range(40):
            f.write(json.dumps({"text": " ".join(f"w{int(i)}" for i in torch.randint(0, 997, (200,), generator=g))}) + "\n")
    rows: list = []
    me = os.path.abspath(__file__)
    _timed("write checkpoint", [py, os.path.join(HERE, "make_synthetic_checkpoint.py"), model, "--shape", "llama-3-8b",
                                "--layers", str(layers)], work, rows, env)
    write_bpe_tokenizer(model, corpus)
    _timed("search (2 steps, 128 tokens, prune from the files)",
           [py, "-m", "dms_llm.commands", "search", "--model", model, "--dtype", "float32", "--target-ratio", "0.8",
            "--prune", "heads,channels,hidden", "--steps", "2", "--seq-len", "128", "--num-samples", "4",
            "--dataset", corpus, "--output-dir", search, "--prune-from-files", "always", "--no-eval"], work, rows, env)
    _timed("prune from the files", [py, "-m", "dms_llm.commands", "prune", "--plan", os.path.join(search, "dms_plan.json"),
                                    "--model", model, "--output-dir", pruned], work, rows, env)
    _timed("reload (dms_llm registered)", [py, me, "--stage", "reload", pruned, os.path.join(work, "reload.pt")], work, rows, env)
    _timed("reload (trust_remote_code, no dms_llm)", [py, me, "--stage", "reload-remote", pruned,
                                                      os.path.join(work, "reload-remote.pt")], work, rows, env)
    _timed("perplexity (2 windows of 128)", [py, me, "--stage", "ppl", pruned, corpus, os.path.join(work, "ppl.json")],
           work, rows, env)
    _timed("export GGUF f32", [py, "-m", "dms_llm.commands", "export", pruned, "--to", "gguf", "--outtype", "f32",
                               "--output", gguf], work, rows, env)
    _timed("llama.cpp logits", [py, me, "--stage", "llamacpp", gguf, os.path.join(work, "llamacpp.pt")], work, rows, env)

    summary = json.load(open(os.path.join(search, "search_summary.json")))
    a, b = (torch.load(os.path.join(work, n)) for n in ("reload.pt", "reload-remote.pt"))
    hf = a["logits"]
    cpp = torch.load(os.path.join(work, "llamacpp.pt"))["logits"]
    checks = {
        "search parity (masked vs pruned, max abs logit diff)": summary["parity_max_abs_diff"],
        "reload both ways: max abs logit diff": float((a["logits"] - b["logits"]).abs().max()),
        "llama.cpp f32 vs transformers: max abs logit diff": float((cpp - hf).abs().max()),
    }
    ppl = json.load(open(os.path.join(work, "ppl.json")))
    ok = checks["reload both ways: max abs logit diff"] <= 1e-5 and checks["llama.cpp f32 vs transformers: max abs logit diff"] <= atol
    result = {"layers": layers, "params": summary["params"], "dense_params": summary["dense_params"],
              "pruned_class": a["class"], "remote_class": b["class"], "ppl": ppl, "checks": checks, "atol": atol,
              "passed": ok, "stages": rows, "torch_threads": env["OMP_NUM_THREADS"]}
    with open(os.path.join(work, "shape_smoke.json"), "w") as f:
        json.dump(result, f, indent=2)
    lines = ["| stage | wall s | peak RSS GiB |", "|---|---|---|"] + [
        f"| {r['stage']} | {r['wall_s']} | {r['peak_rss_gib']} |" for r in rows]
    lines += ["", *(f"- {k}: {v:.3g}" for k, v in checks.items()),
              f"- perplexity over {ppl.get('n_windows')} windows: {ppl.get('ppl')}",
              f"- parameters {summary['dense_params']:,} -> {summary['params']:,}; {a['class']} / {b['class']}",
              f"- {'PASSED' if ok else 'FAILED'} (llama.cpp atol {atol})"]
    with open(os.path.join(work, "shape_smoke.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(model)  # the 3 GB source; the pruned folder and the GGUF file stay for inspection
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("work", nargs="?", help="a new folder for everything this run writes")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the Llama-3-8B-shaped model (at least 2)")
    p.add_argument("--atol", type=float, default=0.05, help="largest llama.cpp vs transformers logit difference (f32)")
    p.add_argument("--stage", choices=["reload", "reload-remote", "ppl", "llamacpp"], help=argparse.SUPPRESS)
    p.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stage:
        paths = [args.work, *args.args]
        {"reload": lambda: stage_reload(*paths, remote=False), "reload-remote": lambda: stage_reload(*paths, remote=True),
         "ppl": lambda: stage_ppl(*paths), "llamacpp": lambda: stage_llamacpp(*paths)}[args.stage]()
        return 0
    if args.work is None:
        p.error("give the work folder")
    if args.layers < 2:
        p.error("--layers must be at least 2")
    return run(os.path.abspath(args.work), args.layers, args.atol)


if __name__ == "__main__":
    sys.exit(main())
