"""What ``export --verify`` costs over a plain export, against the allowance of the issue.

A LoRA adapter on a llama base of ``--gb`` (fp32), exported at each ``--dtype``: bfloat16 (the
case with the weight-by-weight check) and float32 (the stored dtype; no such check); bfloat16
alone in quick mode. Three fresh children per dtype:

* ``plain``: ``modelkit.export(adapter, base=...)``;
* ``verify``: the same with ``verify=True``; the verify step inside it is timed (its extra
  time; the difference of the two export calls is given beside it: it adds the variance of
  writing the same folder twice, up to 1 s here);
* ``allowance``: what the issue allows verification to cost, done with stock libraries only:
  one load of the source (transformers ``from_pretrained`` of the base + PEFT's
  ``PeftModel.from_pretrained`` of the adapter) with its forward on the verify prompts, then
  one ``from_pretrained`` of the export with its forward.

The three run in ``--rounds`` alternating rounds (3; 1 in quick mode) and the figures are
medians: one run of each on this 2-core machine varies by +-0.3 s. The verified child also
times verify's weight-by-weight check (a low-precision export's exact check: one more read of
the export's bytes), reported beside the extra time.

Reads of the source are counted in the modelkit children: every stored tensor read of the
adapter and its base (``modelkit.io.tensors`` notes each read) weighed by its bytes, as passes
over the source's bytes. Targets: verify reads the source at most once more than the plain
export (<= 1.1 passes: the adapter's own small tensors are read by the checks too); its extra
time (the verify step) <= the allowance's (its imports, loads and forwards); its peak RSS <=
1.1 x the allowance's (whose two models are loaded one after the other; the figure's note
gives the peak above the idle floor in float32 copies of the model: holding the reference and
the export together would be 2).

Correctness: the verification passed, and the verified export's tensors equal the plain
export's (the same bytes).

    python benchmarks/bench_verify.py                        # --gb 0.5, bfloat16 and float32
    MODELKIT_BENCH_QUICK=1 python benchmarks/bench_verify.py    # small: a smoke test
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from bench_export import _child_main, child_idle, child_setup_lora, run_child, same_tensors  # noqa: E402
from summary import agrees, at_most, finish, info, quick  # noqa: E402


# --------------------------------------------------------------------------- children


def _count_source_reads(folders: list[str]) -> dict:
    """Count every stored tensor read from files under ``folders``: {"reads", "bytes"},
    and the folders' total stored bytes; patched into ``modelkit.io.tensors``."""
    import modelkit.io.tensors as tensors

    sizes = {}
    for folder in folders:
        for p in Path(folder).iterdir():
            if p.suffix in (".safetensors", ".bin", ".pt"):
                for t in tensors.TensorFile.open(p).entries.values():
                    sizes[(str(p), t.key)] = t.nbytes
    counts = {"reads": 0, "bytes": 0, "stored_bytes": sum(sizes.values()), "stored_tensors": len(sizes)}
    real = tensors._note_read

    def note(path, key):
        if (str(path), key) in sizes:
            counts["reads"] += 1
            counts["bytes"] += sizes[(str(path), key)]
        real(path, key)

    tensors._note_read = note
    return counts


def child_export(adapter: str, base: str, out: str, dtype: str, shard: str, verify: bool) -> dict:
    import torch  # noqa: F401  (imported before the clock starts, as the allowance does)
    from transformers import AutoModelForCausalLM  # noqa: F401

    import modelkit

    counts = _count_source_reads([adapter, base])
    verify_s, check_s = _timed("verify_folder"), _timed("check_stored_weights")
    t = time.perf_counter()
    result = modelkit.export(adapter, out, base=base, dtype=dtype, max_shard_size=shard,
                             verify=verify, progress=False)
    return {"export_s": time.perf_counter() - t, "ok": result.ok, "bytes": result.bytes,
            "verification": result.verification, "verify_s": verify_s[0], "check_s": check_s[0], **counts}


def _timed(name: str) -> list[float]:
    """Seconds spent in ``modelkit.ops.verify.<name>`` (``[s]``, filled as it runs)."""
    import modelkit.ops.verify as verify

    spent, real = [0.0], getattr(verify, name)

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t

    setattr(verify, name, timed)
    return spent


def child_allowance(adapter: str, base: str, out: str, prompts: list[list[int]]) -> dict:
    """One stock load of the source with its forward, then one of the export with its forward."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    ids = [torch.tensor([p]) for p in prompts]
    t = time.perf_counter()
    from peft import PeftModel  # on the clock: the verified export imports it for its reference too

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    with torch.no_grad():
        for x in ids:
            model(input_ids=x)
    source_s = time.perf_counter() - t
    del model
    gc.collect()
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        for x in ids:
            model(input_ids=x)
    return {"source_s": source_s, "export_load_s": time.perf_counter() - t}


def child_prompts(out: str) -> dict:
    """The token ids ``--verify`` runs (the export's tokenizer), for the allowance child."""
    from modelkit.ops.verify import folder_prompt_ids

    return {"prompts": [x[0].tolist() for x in folder_prompt_ids(Path(out))]}


CHILDREN = {"setup_lora": child_setup_lora, "export": child_export, "allowance": child_allowance,
            "prompts": child_prompts, "idle": child_idle}


# --------------------------------------------------------------------------- parent


SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def main(argv: list[str] | None = None) -> int:
    small = quick()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=0.02 if small else 0.5, help="size of the fp32 base model")
    p.add_argument("--hidden", type=int, default=256 if small else 2048)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--dtype", action="append", choices=tuple(SHORT),
                   help="export dtype, repeatable (default: bfloat16 and float32; bfloat16 alone in quick mode)")
    p.add_argument("--max-shard-size", default="100MB")
    p.add_argument("--workdir", help="where artifacts and exports go (default: a temp folder)")
    p.add_argument("--rounds", type=int, default=1 if small else 3,
                   help="alternating rounds of plain / verified / allowance (medians reported)")
    args = p.parse_args(argv)
    dtypes = args.dtype or (["bfloat16"] if small else ["bfloat16", "float32"])

    scratch = HERE.parent / "_work"
    work = Path(args.workdir or tempfile.mkdtemp(prefix="modelkit-bench-",
                                                 dir=scratch if scratch.is_dir() else None)).absolute()
    work.mkdir(parents=True, exist_ok=True)
    run = lambda role, **kw: run_child(role, script=HERE, **kw)  # noqa: E731  (run_child syncs first)
    try:
        idle = run("idle")
        setup = run("setup_lora", work=work, gb=args.gb, hidden=args.hidden, r=args.r)
        figs = []
        for dtype in dtypes:
            figs += _measure(run, work / dtype, setup, idle, dtype, args)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return finish("bench_verify", figs)


def _measure(run, work: Path, setup: dict, idle: dict, dtype: str, args) -> list:
    """Plain, verified and allowance children for exports at ``dtype``, in ``--rounds``
    alternating rounds; the figures, named by the dtype."""
    common = {"adapter": setup["adapter"], "base": setup["base"], "dtype": dtype, "shard": args.max_shard_size}
    plains, verifieds, allowances, prompts = [], [], [], None
    for i in range(args.rounds):  # alternating, so that drift in the machine lands on all three
        plains.append(run("export", out=str(work / f"plain{i}"), verify=False, **common))
        verifieds.append(run("export", out=str(work / f"verified{i}"), verify=True, **common))
        prompts = prompts or run("prompts", out=str(work / "plain0"))["prompts"]
        allowances.append(run("allowance", adapter=setup["adapter"], base=setup["base"],
                              out=str(work / "plain0"), prompts=prompts))
    worst, n, odd = same_tensors(work / "verified0", work / "plain0")

    plain, verified = plains[0], verifieds[0]
    passes = lambda m: m["bytes"] / m["stored_bytes"]  # noqa: E731
    extra_passes = passes(verified) - passes(plain)
    extras = [v["verify_s"] for v in verifieds]  # the verify step itself, inside the verified export
    differences = [v["export_s"] - p["export_s"] for p, v in zip(plains, verifieds)]
    allowed = [a["source_s"] + a["export_load_s"] for a in allowances]
    extra_s, allowed_s = statistics.median(extras), statistics.median(allowed)
    check_s = statistics.median(v["check_s"] for v in verifieds)
    peak_mb = statistics.median(v["peak_mb"] for v in verifieds)
    allowance_mb = statistics.median(a["peak_mb"] for a in allowances)
    allowance = allowances[0]
    listed = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    rounds = (f"median of {args.rounds} alternating rounds: verify step {listed(extras)} s; allowance "
              f"{listed(allowed)} s; verified minus plain export call {listed(differences)} s (median "
              f"{statistics.median(differences):.2f}: the write of the same folder varies by up to 1 s)")
    model_mb = plain["stored_bytes"] / 2**20          # the fp32 base: one float32 copy of the model
    held_mb = peak_mb - idle["peak_mb"]
    v = verified["verification"] or {}
    low = dtype != "float32"
    name = f"verify {SHORT[dtype]}"
    what = (f"llama {setup['layers']} layers, hidden {args.hidden}, LoRA r {args.r}, "
            f"{plain['stored_bytes'] / 1e9:.2f} GB fp32 -> {dtype}")
    figs = [
        at_most(f"{name}: extra passes over the source ({what})", extra_passes, 1.1, "passes",
                note=f"plain export {passes(plain):.2f} passes ({plain['reads']} reads), verified "
                     f"{passes(verified):.2f} ({verified['reads']} reads) of {plain['stored_tensors']} "
                     "stored tensors; before this change a bf16 verify read the source twice more"),
        at_most(f"{name}: extra time", extra_s, 1.0, "s", on_ratio=True,
                baseline="one stock load + forward of the source and of the export", baseline_value=allowed_s,
                note=f"{rounds}; export call {plain['export_s']:.1f} s plain, {verified['export_s']:.1f} s "
                     f"verified; allowance: source {allowance['source_s']:.1f} s + export "
                     f"{allowance['export_load_s']:.1f} s"),
    ]
    if low:
        figs.append(info(f"{name}: of which the weight-by-weight check", check_s, "s",
                         note="each stored tensor against the source's dense weight rounded to the export's "
                              "dtype: one more read of the export's bytes, beyond the allowance"))
    figs += [
        at_most(f"{name}: peak RSS", peak_mb, 1.1, "MB", on_ratio=True,
                baseline="the allowance (stock libraries)", baseline_value=allowance_mb,
                note=f"plain export {plain['peak_mb']:.0f} MB, idle {idle['peak_mb']:.0f} MB, one float32 copy "
                     f"of the model {model_mb:.0f} MB: the verified export holds {held_mb / model_mb:.2f} of it "
                     "above the idle floor (the reference and the export one at a time; together is 2x)"),
        info(f"{name}: whole-process time", verified["wall_s"], "s", baseline="plain export",
             baseline_value=plain["wall_s"]),
        agrees(f"{name}: verified export passed and equals the plain export",
               all(x["ok"] and (x["verification"] or {}).get("ok") for x in verifieds)
               and worst == 0.0 and n > 0 and not odd
               and (not low or v.get("weights_misrounded") == 0),
               note=f"max |logit diff| {v.get('max_abs_diff', float('nan')):.3g} (tolerance "
                    f"{v.get('tolerance', float('nan')):.3g})"
                    + (f"; stored weights vs the source's rounded: {v.get('weights_compared')} tensors, "
                       f"{v.get('weights_misrounded')} values misrounded" if low else "")
                    + f"; {n} tensors identical: {worst == 0.0}"),
    ]
    print(json.dumps({"dtype": dtype, "plain": plains, "verified": verifieds, "allowance": allowances,
                      "idle": idle}, default=str, indent=1)[:3000])
    return figs


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        _child_main(sys.argv[2], sys.argv[3], CHILDREN)
    else:
        sys.exit(main())
