"""Does budget mode's error model rank tensors as the model does? Single-group changes, each
predicted and measured.

    python bench/sensitivity.py [--work DIR] [--preset quant] [--seed 11] [--qtype Q2_K] [--imatrix]

Base: every tensor at Q8_0 (`int8`). Each case moves one group of tensors (a layer's attention
inner matrices or output, its routed experts' gate/up or down, its shared expert, the dense
FFN, the embeddings, the LM head) to --qtype, quantizes with `step-gguf quantize` and measures
the KL divergence from the F32 model on the held-out end of the calibration text (llama-
perplexity). Predicted: the sum over the group of what budget mode's model says the change
adds (sensitivity.py): as the model was before (the tensors' measured errors over the stream's
energy), with a routed expert's output weighed by its routing weight, and also by the depth
each enters at (the propagation gains `step-gguf imatrix` measures on the model and stores in
the imatrix; measured here on the BF16 model for the run without one). Printed: each per case,
the measured change, and Spearman's rank correlation of each prediction with it; the measured
figures are kept in the work folder for reruns.
"""

from __future__ import annotations

import json
import re

import numpy as np

# run as a script, bench/ is on sys.path
from _common import QUALITY_CTX, machine_parser, quality_files, work_dir

from step_gguf.core.recipe import Recipe, Rule, load_recipe
from step_gguf.files.imatrix import load_imatrix
from step_gguf.native import propagation, tools
from step_gguf.pipeline import budget
from step_gguf.pipeline.quantize import QuantizeOptions, attach_imatrix, open_source, quantize
from step_gguf.pipeline.sensitivity import logit_errors
from gguf import GGMLQuantizationType as Q


def groups(n_layer: int) -> dict[str, str]:
    """name -> pattern of the groups moved, in a first, middle and last MoE layer."""
    out = {"token_embd": r"^token_embd\.", "output": r"^output\.", "dense ffn gate/up": r"^blk\.0\.ffn_(gate|up)\.",
           "dense ffn down": r"^blk\.0\.ffn_down\."}
    for layer in sorted({1, n_layer // 2, n_layer - 1}):
        b = rf"^blk\.{layer}\."
        out |= {f"{layer} attn q/k/v/gate": b + r"attn_(q|k|v|gate)\.", f"{layer} attn_output": b + r"attn_output\.",
                f"{layer} experts gate/up": b + r"ffn_(gate|up)_exps\.", f"{layer} experts down": b + r"ffn_down_exps\.",
                f"{layer} shared expert": b + r"ffn_(gate|up|down)_shexp\."}
    return out


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = (np.argsort(np.argsort(x)).astype(float) for x in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    ap = machine_parser(__doc__, "the checkpoint, its GGUFs and the measured figures")
    ap.set_defaults(preset="quant")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--qtype", default="Q2_K", choices=[t.name for t in budget.LADDER])
    ap.add_argument("--imatrix", action="store_true", help="with the importance matrix, both sides")
    a = ap.parse_args()
    work = work_dir(a.work, "step-gguf-sens-")
    q = quality_files(work, a.preset, a.seed, a.threads)
    base = load_recipe("int8")
    imat = load_imatrix(q.imatrix) if a.imatrix else None
    source = open_source(q.src, base)
    plans = attach_imatrix(source.plans, imat, base)
    trunk = budget.trunk(plans, source.n_layer)
    measured_errors = budget.measure_tensors(trunk, imat, source.top_k, work / "sensitivity-cache")
    gains = imat.propagation if imat is not None else \
        propagation.measure_file(q.bf16, tools.default_text(), ctx=QUALITY_CTX, threads=a.threads)
    order = [p.name for p in trunk]
    w = source.routing_weight
    models = {"before": logit_errors(measured_errors, order),
              "+routing weight": logit_errors(measured_errors, order, routing_weight=w),
              "+depth gains": logit_errors(measured_errors, order, gains, w)}
    tag = f"{a.qtype}-{'imatrix' if a.imatrix else 'plain'}"
    store = work / f"measured-{tag}.json"
    measured: dict[str, float] = json.loads(store.read_text()) if store.exists() else {}

    def kld(name: str, recipe: Recipe) -> float:
        if name not in measured:
            out = work / "case.gguf"
            quantize(q.src, out, recipe, QuantizeOptions(imatrix=q.imatrix if a.imatrix else None, resume=False))
            measured[name] = tools.kld(out, q.f32, q.held_out, ctx=QUALITY_CTX, threads=a.threads)["kld_mean"]
            out.unlink()
            store.write_text(json.dumps(measured, indent=1))
        return measured[name]

    base_kld = kld("base", base)
    rows = []
    for name, pattern in groups(source.n_layer).items():
        members = [p.name for p in trunk if re.search(pattern, p.name) and p.name in measured_errors]
        case = Recipe(f"int8+{name}", "", (Rule(pattern, Q[a.qtype], "moved"),) + base.rules)
        preds = [sum(m[n][a.qtype] - m[n]["Q8_0"] for n in members) for m in models.values()]
        rows.append((name, len(members), *preds, kld(name, case) - base_kld))
        print(f"  {name:<24} done", flush=True)
    print(f"\n{a.preset} seed {a.seed}, {'with' if a.imatrix else 'without'} imatrix: one group to {a.qtype} "
          f"from all Q8_0 (KLD {base_kld:.5f}); predictions scaled to the measured changes' geometric mean")
    print(f"  {'group':<24} {'tensors':>7} " + " ".join(f"{m:>16}" for m in models) + f" {'measured dKLD':>14}")
    cols = list(zip(*[r[2:] for r in rows]))
    scale = [np.exp(np.mean(np.log(cols[-1]) - np.log(np.maximum(c, 1e-30)))) for c in cols[:-1]]
    for name, n, *vals in sorted(rows, key=lambda r: -r[-1]):
        print(f"  {name:<24} {n:>7} " + " ".join(f"{v * s:16.5f}" for v, s in zip(vals[:-1], scale)) + f" {vals[-1]:14.5f}")
    for i, m in enumerate(models):
        print(f"Spearman rank correlation, {m}, predicted vs measured: {spearman(list(cols[i]), list(cols[-1])):.3f} "
              f"over {len(rows)} groups")


if __name__ == "__main__":
    main()
