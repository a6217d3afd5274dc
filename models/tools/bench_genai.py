"""ONNX decode speed: logitprobe's `trace` against onnxruntime-genai's own generate loop on the
same onnxruntime-genai (builder-layout) export, greedy, alternating runs, medians.

Usage (scripts/bench-onnx-genai runs it): bench_genai.py --logitprobe BIN --model GENAI_DIR
    [--optimum DIR] [--baseline OTHER_BIN] [--runs 3] [--threads 1,2] [--tokens 128] [--cpu-time]

Both sides run in a fresh process per run and are timed over the single-token steps only (the
prompt's forward pass and the model load are left out): ours is run.json's
`timings.decode_tokens_per_s`, genai's the `generate_next_token` loop after `append_tokens`,
whose first call only picks a token from the prompt's logits. Both decode the same prompt ids
greedily, so they should generate the same tokens; the script says when they do not.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

PROMPT = "Once upon a time, in a lighthouse on a rocky island, there lived an old keeper who"


def genai_worker(model, threads, tokens, prompt_ids):
    import onnxruntime_genai as og

    cfg = og.Config(model)
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    m = og.Model(cfg)
    p = og.GeneratorParams(m)
    p.set_search_options(do_sample=False, max_length=len(prompt_ids) + tokens)
    g = og.Generator(m, p)
    g.append_tokens(prompt_ids)
    n = 0
    t0 = time.perf_counter()
    while not g.is_done():
        g.generate_next_token()
        n += 1
    dt = time.perf_counter() - t0
    seq = [int(t) for t in g.get_sequence(0)][len(prompt_ids):]
    # n calls = n - 1 forward passes of one token (the first picks from the prompt's logits).
    print(json.dumps({"tps": (n - 1) / dt, "ids": seq}))


def child(cmd):
    """Runs `cmd`; its output and the CPU seconds (user + system) it used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return out, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def run_genai(model, threads, tokens, prompt_ids):
    out, cpu = child(
        [sys.executable, __file__, "--genai-worker", "--model", model, "--threads", str(threads),
         "--tokens", str(tokens), "--ids", ",".join(map(str, prompt_ids))])
    return dict(json.loads(out.stdout.strip().splitlines()[-1]), cpu=cpu)


def run_ours(binary, model, threads, tokens):
    with tempfile.TemporaryDirectory() as d:
        _, cpu = child(
            [binary, "trace", "-m", model, "-p", PROMPT, "--temperature", "0", "--max-new-tokens", str(tokens),
             "--threads", str(threads), "--no-plots", "-o", d])
        with open(os.path.join(d, "run.json")) as f:
            run = json.load(f)
        with open(os.path.join(d, "steps.jsonl")) as f:
            ids = [json.loads(line)["selected"]["token_id"] for line in f if line.strip()]
    return {"tps": run["timings"]["decode_tokens_per_s"], "ids": ids, "cpu": cpu}


def cpu_tps(long, tokens, short):
    """Decode tokens per CPU second: the CPU seconds a run of `tokens` used (`long`) beyond a
    run of one token (`short`: load and prompt), per token. At one thread this leaves out the
    time other processes took the core, which moves wall-clock rates by ±20 % here."""
    return (tokens - 1) / max(long - short, 1e-9)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--logitprobe")
    ap.add_argument("--model", required=True)
    ap.add_argument("--optimum", help="also time ours on this optimum-layout export")
    ap.add_argument("--baseline", help="also time this other logitprobe binary (an older build) on the genai export")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--cpu-time", action="store_true",
                    help="at 1 thread: also decode tok/s per CPU second (each side also runs once with 1 token)")
    ap.add_argument("--genai-worker", action="store_true")
    ap.add_argument("--ids")
    a = ap.parse_args()
    if a.genai_worker:
        genai_worker(a.model, int(a.threads), a.tokens, [int(t) for t in a.ids.split(",")])
        return
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(os.path.join(a.model, "tokenizer.json")).encode(PROMPT, add_special_tokens=False).ids
    print(f"{os.path.basename(os.path.normpath(a.model))}: {a.tokens} greedy tokens after a {len(ids)}-token prompt, "
          f"fp32; medians of {a.runs} alternating runs")
    for t in [int(x) for x in a.threads.split(",")]:
        ours, genai, opt, base, cpu_ours, cpu_genai = [], [], [], [], [], []
        cpu = a.cpu_time and t == 1
        if cpu:
            short_ours = run_ours(a.logitprobe, a.model, t, 1)["cpu"]
            short_genai = run_genai(a.model, t, 1, ids)["cpu"]
        for r in range(a.runs):
            o = run_ours(a.logitprobe, a.model, t, a.tokens)
            g = run_genai(a.model, t, a.tokens, ids)
            ours.append(o["tps"])
            genai.append(g["tps"])
            line = f"  run {r + 1}, {t} thread(s): ours {o['tps']:.1f} tok/s, onnxruntime-genai {g['tps']:.1f} tok/s"
            if a.baseline:
                b = run_ours(a.baseline, a.model, t, a.tokens)
                base.append(b["tps"])
                line += f", baseline build {b['tps']:.1f} tok/s"
            if a.optimum:
                p = run_ours(a.logitprobe, a.optimum, t, a.tokens)
                opt.append(p["tps"])
                line += f", ours on the optimum export {p['tps']:.1f} tok/s"
            if cpu:
                co = cpu_tps(o["cpu"], a.tokens, short_ours)
                cg = cpu_tps(g["cpu"], a.tokens, short_genai)
                cpu_ours.append(co)
                cpu_genai.append(cg)
                line += f"; per CPU second: ours {co:.1f}, genai {cg:.1f}"
            if o["ids"] != g["ids"]:
                same = next((i for i, (x, y) in enumerate(zip(o["ids"], g["ids"])) if x != y), min(len(o["ids"]), len(g["ids"])))
                line += f" (tokens differ from position {same}: {len(o['ids'])} vs {len(g['ids'])} generated)"
            print(line, flush=True)
        mo, mg = statistics.median(ours), statistics.median(genai)
        line = f"{t} thread(s): ours {mo:.1f} tok/s, onnxruntime-genai {mg:.1f} tok/s, ours/genai = {mo / mg:.3f}"
        if cpu_ours:
            co, cg = statistics.median(cpu_ours), statistics.median(cpu_genai)
            line += f"; per CPU second: ours {co:.1f}, genai {cg:.1f}, ours/genai = {co / cg:.3f}"
        if base:
            mb = statistics.median(base)
            line += f"; baseline build {mb:.1f} tok/s, ours/baseline = {mo / mb:.3f}"
        if opt:
            line += f"; ours on the optimum export {statistics.median(opt):.1f} tok/s"
        print(line, flush=True)


if __name__ == "__main__":
    main()
