"""Audit TCA-Attention in every layer of a Hugging Face Llama-family model, in place.

The model runs its own attention (PyTorch SDPA) unchanged; an attention function
registered with transformers' `AttentionInterface` sees each layer's query, key and value
after RoPE — q [B, Hq, L, d], k and v [B, Hkv, L, d], before GQA repetition — hands them
to `tca.bound` (the f64 CPU oracle: selection of docs/algorithm.md §1, Theorem 1 audit of
§4) and then computes the layer's real output. One prefill pass audits all layers.

    pip install ./python torch "transformers>=4.48"
    python python/examples/audit_hf_model.py --text some.txt --tokens 1024 \
        [--model HuggingFaceTB/SmolLM2-135M-Instruct] [--config configs/model.toml] \
        [--calibrate-text other.txt]

Without --calibrate-text each layer calibrates itself on the audited prompt (what
`tca bound` does without --profile); with it, a first pass calibrates every layer on that
text (`tca.calibrate`) and the audit uses those profiles, as the paper's offline
calibration does. The audit costs O(Hq L^2 d) per layer in f64 on the CPU: keep the
prompt to a few thousand tokens. The model must use the AttentionInterface (Llama,
Qwen2, Mistral, Gemma, SmolLM2, ... in transformers >= 4.48). Prints one row per layer
and the readings that fail anywhere.

This file is not run by CI (it needs torch, transformers and model weights from the
hub); its syntax is checked by python/tests/test_example.py.
"""

import argparse
import sys

import torch
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import tca

READINGS = ["identity", "linf_entrymax", "l1_entrymax", "l1_induced", "l2_diameter",
            "gamma_le_1_minus_tau"]


def layer_arrays(query, key, value):
    """Batch element 0 as float64 numpy arrays [H, L, d] (exact for bf16/f16/f32)."""
    return [t[0].detach().to(torch.float64).cpu().numpy() for t in (query, key, value)]


class Auditor:
    """The attention function registered with transformers: it records what tca says
    about each layer (or calibrates it, in calibration mode), then runs SDPA."""

    def __init__(self, config):
        self.config = config
        self.profiles = {}
        self.calibrating = False
        self.results = {}

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        layer = module.layer_idx
        # Prefill only: a decode step (one query) has nothing for TCA to select.
        if query.shape[2] == key.shape[2] and query.shape[2] > 1:
            q, k, v = layer_arrays(query, key, value)
            if self.calibrating:
                self.profiles[layer] = tca.calibrate(q, k, v, self.config, layer=layer)
            else:
                self.results[layer] = tca.bound(
                    q, k, v, self.config, self.profiles.get(layer), layer=layer)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def prefill(model, ids):
    with torch.no_grad():
        model(ids, use_cache=False)


def table(results):
    print(f"{'layer':>5} {'mean_gamma':>10} {'max_gamma':>9} {'kept':>6}  failing readings")
    failing = {}
    for layer in sorted(results):
        s = results[layer]["summary"]
        bad = [k for k in READINGS if not s["readings"][k]["holds"]]
        for k in bad:
            failing[k] = failing.get(k, 0) + 1
        print(f"{layer:>5} {s['mean_gamma']:>10.3e} {s['max_gamma']:>9.3e} "
              f"{s['mean_kept_fraction']:>6.1%}  {', '.join(bad) or '-'}")
    n = len(results)
    for k in READINGS:
        print(f"{k:<22} fails in {failing.get(k, 0)} of {n} layers")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    ap.add_argument("--text", required=True, help="text file to audit on")
    ap.add_argument("--tokens", type=int, default=1024, help="prompt length L")
    ap.add_argument("--config", default="configs/model.toml",
                    help="TCA configuration (TOML; docs/algorithm.md §7)")
    ap.add_argument("--calibrate-text", help="calibrate every layer on this text first")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a = ap.parse_args(argv)

    auditor = Auditor(a.config)
    AttentionInterface.register("tca_audit", auditor)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(
        a.model, torch_dtype=getattr(torch, a.dtype), attn_implementation="tca_audit")
    model.eval()

    def prompt(path):
        ids = tok(open(path, encoding="utf-8").read(), return_tensors="pt").input_ids
        if ids.shape[1] < a.tokens:
            sys.exit(f"{path} has {ids.shape[1]} tokens, fewer than --tokens {a.tokens}")
        return ids[:, :a.tokens]

    try:
        if a.calibrate_text:
            auditor.calibrating = True
            prefill(model, prompt(a.calibrate_text))
            auditor.calibrating = False
        prefill(model, prompt(a.text))
    except tca.TcaError as e:
        sys.exit(f"error: {e}")
    table(auditor.results)


if __name__ == "__main__":
    main()
