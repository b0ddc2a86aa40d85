#!/usr/bin/env python3
"""The transformers side of the GPU check (scripts/gpu-check.sh runs it after gpu_check).

Reads OUT/rust-results.json (written by engine/examples/gpu_check.rs), loads the same gpu-1b
folder into transformers' NemotronForSequenceClassification and:

- accuracy: each gpu-1b sequence alone in fp32 over the bf16 weights (the reference) and in bf16;
  arbiter's scores and HF bf16's against the reference with the issue's error
  (max|got-ref| / max(max|ref|, 1e-3) per sequence; target 2e-2) and the rankings;
- throughput: the same 2k/8k/16k batches through HF in bf16 with sdpa attention, right-padded to
  the longest sequence (how HF batches variable lengths), tokens/s over the real tokens.

The head is applied in fp32 to the last real token's hidden state, as arbiter does (HF's own
classification pooling needs a pad id and computes the head in the model dtype).

Prints the final tables, appends them to the report (--report, default OUT/gpu-check.md), exits 1 when an accuracy check fails.
The performance targets (>= 60% of the GEMM ceiling at 8k-16k tokens, >= 1.5x HF) are reported
as met or missed; they do not change the exit code.
"""
import argparse
import json
import os
import statistics
import sys
import time


def rel_error(got, ref):
    scale = max([abs(r) for r in ref] + [1e-3])
    return max(abs(g - r) for g, r in zip(got, ref)) / scale


def ranking(scores):
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def build_model(model_dir, torch, transformers):
    """NemotronForSequenceClassification over the folder's config and safetensors, sdpa attention."""
    from safetensors.torch import load_file

    with open(os.path.join(model_dir, "config.json")) as f:
        c = json.load(f)
    kw = dict(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_key_value_heads"], head_dim=c["head_dim"],
        max_position_embeddings=c["max_position_embeddings"], norm_eps=c["norm_eps"], hidden_act=c["hidden_act"],
        num_labels=c["num_labels"], pad_token_id=None, bos_token_id=None, eos_token_id=None,
    )
    major = int(transformers.__version__.split(".")[0])
    if major >= 5:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": c["rope_theta"],
                                 "partial_rotary_factor": c["partial_rotary_factor"]}
    else:
        kw["rope_theta"] = c["rope_theta"]
        kw["partial_rotary_factor"] = c["partial_rotary_factor"]
    config = transformers.NemotronConfig(**kw)
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = transformers.NemotronForSequenceClassification(config)
    state = load_file(os.path.join(model_dir, "model.safetensors"), device="cuda")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if "rotary" not in m]
    if missing or unexpected:
        raise SystemExit(f"gpu_hf: weights do not match the model: missing {missing}, unexpected {unexpected}")
    inv_freq = getattr(getattr(model.model, "rotary_emb", None), "inv_freq", None)
    want = int(c["head_dim"] * c["partial_rotary_factor"])
    if inv_freq is None:
        print("gpu_hf: note: cannot read transformers' rotary frequencies to check the rotary size")
    elif inv_freq.numel() * 2 != want:
        raise SystemExit(f"gpu_hf: transformers rotates {inv_freq.numel() * 2} channels per head, the config says {want}")
    return model.eval()


def scores(model, torch, seqs):
    """Head outputs (first output) at each sequence's last real token; one right-padded batch."""
    lens = [len(s) for s in seqs]
    width = max(lens)
    ids = torch.zeros((len(seqs), width), dtype=torch.long, device="cuda")
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device="cuda")
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, device="cuda")
        mask[i, : len(s)] = 1
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    last = hidden[torch.arange(len(seqs), device="cuda"), torch.tensor(lens, device="cuda") - 1].float()
    return last @ model.score.weight.float().T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="folder with rust-results.json; hf-results.json is written there")
    ap.add_argument("--report", help="markdown file the tables are appended to (default OUT/gpu-check.md)")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    with open(os.path.join(args.out, "rust-results.json")) as f:
        rust = json.load(f)
    if "gpu1b" not in rust and "throughput" not in rust:
        print("gpu_hf: nothing to compare (gpu_check ran without gpu1b/throughput)")
        return 0

    import torch
    import transformers

    # The fp32 reference must be fp32: no TF32 in matmuls or convolutions.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    lines = []

    def out(s=""):
        print(s, flush=True)
        lines.append(s)

    failures = []
    t0 = time.time()
    model = build_model(rust["model_dir"], torch, transformers)
    out(f"\n## transformers {transformers.__version__} (torch {torch.__version__}) on {torch.cuda.get_device_name()}")
    out(f"gpu-1b loaded in transformers in {time.time() - t0:.1f} s")

    with torch.inference_mode():
        if "gpu1b" in rust:
            g = rust["gpu1b"]
            seqs = g["sequences"]
            model.float()
            ref = [float(scores(model, torch, [s])[0, 0]) for s in seqs]
            model.to(torch.bfloat16)
            hf = [float(scores(model, torch, [s])[0, 0]) for s in seqs]
            out("\n### gpu-1b accuracy against transformers fp32 (over the same bf16 weights)")
            out("| | worst error | target | ranking |")
            out("|---|---|---|---|")
            ref_rank = ranking(ref)
            for name, got in [("arbiter CUDA, alone", g["alone"]), ("arbiter CUDA, packed", g["packed"]),
                              ("transformers bf16 (context)", hf)]:
                err = max(rel_error([a], [b]) for a, b in zip(got, ref))
                same = ranking(got) == ref_rank
                verdict = "ok" if err <= 2e-2 and same else "FAIL"
                out(f"| {name} | {err:.2e} | 2e-2 | {'identical' if same else 'differs'} ({verdict}) |")
                if name.startswith("arbiter") and verdict == "FAIL":
                    failures.append(f"gpu-1b {name}: error {err:.3e}, ranking {'same' if same else 'differs'}")
            out(f"reference scores: {[round(v, 5) for v in ref]}")

        if "throughput" in rust:
            tp = rust["throughput"]
            model.to(torch.bfloat16)
            ceiling = tp["ceiling_tflops"]
            out(f"\n### Throughput, gpu-1b, bf16 (cuBLASLt GEMM ceiling {ceiling:.0f} TFLOP/s, measured by gpu_check)")
            out("| tokens | seqs | arbiter tok/s | arbiter TFLOP/s | % ceiling | HF sdpa tok/s | HF TFLOP/s | arbiter / HF |")
            out("|---|---|---|---|---|---|---|---|")
            for b in tp["batches"]:
                seqs = b["sequences"]
                for _ in range(2):
                    scores(model, torch, seqs)
                times = []
                for _ in range(args.reps):
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    scores(model, torch, seqs)
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t)
                hf_s = statistics.median(times)
                hf_tps = b["tokens"] / hf_s
                hf_tflops = b["flops"] / hf_s / 1e12
                ratio = b["tokens_per_s"] / hf_tps
                pct = 100 * b["tflops"] / ceiling
                out(f"| {b['tokens']} | {len(seqs)} | {b['tokens_per_s']:.0f} | {b['tflops']:.0f} | {pct:.0f}% | "
                    f"{hf_tps:.0f} | {hf_tflops:.0f} | {ratio:.2f}x |")
                b["hf_median_s"] = hf_s
                b["hf_tokens_per_s"] = hf_tps
                b["ratio"] = ratio
            out("\nTargets (issue 6):")
            for b in tp["batches"]:
                if b["tokens"] >= 8192:
                    pct = 100 * b["tflops"] / ceiling
                    out(f"- {b['tokens']} tokens: {pct:.0f}% of the GEMM ceiling (target >= 60%): "
                        f"{'met' if pct >= 60 else 'MISSED'}")
                out(f"- {b['tokens']} tokens: {b['ratio']:.2f}x transformers (target >= 1.5x): "
                    f"{'met' if b['ratio'] >= 1.5 else 'MISSED'}")
            hf_rows = [{k: b[k] for k in ("tokens", "hf_median_s", "hf_tokens_per_s", "ratio")} for b in tp["batches"]]
            with open(os.path.join(args.out, "hf-results.json"), "w") as f:
                json.dump({"transformers": transformers.__version__, "torch": torch.__version__,
                           "gpu1b_reference": ref if "gpu1b" in rust else None, "batches": hf_rows}, f, indent=1)

    if failures:
        out(f"\nRESULT (transformers side): {len(failures)} FAILED")
        for f_ in failures:
            out(f"  - {f_}")
    else:
        out("\nRESULT (transformers side): accuracy checks passed")
    with open(args.report or os.path.join(args.out, "gpu-check.md"), "a") as f:
        f.write("\n".join(lines) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
