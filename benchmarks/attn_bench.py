#!/usr/bin/env python3
"""Decode-step micro-benchmark for the Granite Vision 3.2 2B language model (GraniteForCausalLM).

Random weights (torch.manual_seed(0)), no download. Measures, for a batch of left-padded prompts:
  * the chunked prefill time (default sdpa),
  * per decode step time / peak memory / token agreement for several attention variants:
      sdpa            transformers' own sdpa path (reference). NB: transformers >= 5.2x no longer
                      repeat_kv's at decode (q_len == 1): it "packs" the 32 query heads as
                      (8 kv heads x 4) (`pack_gqa`) and calls SDPA on the 8 KV heads directly.
      sdpa_repeat_kv  custom AttentionInterface fn: explicit repeat_kv(8 -> 32) + mask (what
                      transformers <= 5.17 does at decode with a padding mask).
      sdpa_gqa        custom AttentionInterface fn: SDPA(attn_mask=mask, enable_gqa=True), no repeat_kv.
      sdpa_static     transformers' sdpa + StaticCache (no torch.cat of the whole KV cache per step).
      flex_attention  transformers' flex_attention integration (torch.compile'd flex kernel).
      sdpa_force_gqa  (opt-in) transformers' sdpa with TRANSFORMERS_SDPA_FORCE_GQA=1 (same SDPA call
                      as sdpa_gqa, but via the built-in function).
  * which code path actually ran (counted calls of repeat_kv / pack_gqa / SDPA / flex / custom fns),
  * which SDPA backends accept the decode attention call and what one call costs on each,
  * a torch.profiler breakdown of two decode steps (top kernels / aten ops by device time).

All variants decode from the same prefilled cache. The reference (first variant) decodes greedily;
every other variant is teacher-forced with the reference's tokens so that its per-step argmax can be
compared with the reference's (agreement %). Timing does not depend on which tokens are fed.

Usage (GPU):   python3 benchmarks/attn_bench.py                      (defaults: rows 64, ctx 6000, steps 32)
Usage (smoke): python3 benchmarks/attn_bench.py --smoke --device cpu (tiny fp32 model, seconds)
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import platform
import re
import signal
import statistics
import sys
import time
import traceback

import torch

T0 = time.monotonic()

# text_config of ibm-granite/granite-vision-3.2-2b (copied from shared/granite/granite-vision-3.2-2b.config.json,
# embedded because the GPU machine does not have that folder).
GRANITE_32_TEXT_CONFIG = {
    "attention_bias": False,
    "attention_dropout": 0.1,
    "attention_multiplier": 0.015625,
    "bos_token_id": 0,
    "embedding_multiplier": 12.0,
    "eos_token_id": 0,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "logits_scaling": 8.0,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "num_attention_heads": 32,
    "num_hidden_layers": 40,
    "num_key_value_heads": 8,
    "pad_token_id": 0,
    "residual_multiplier": 0.22,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 300000.0,
    "tie_word_embeddings": True,
    "vocab_size": 49156,
}
SMOKE_OVERRIDES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "attention_multiplier": 1.0 / 16,  # 1/head_dim, as in the real config (1/64)
}
CONFIG_CANDIDATES = [
    "/work/shared/granite/granite-vision-3.2-2b.config.json",
    os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "shared", "granite", "granite-vision-3.2-2b.config.json"
    ),
]
ALL_VARIANTS = ["sdpa", "sdpa_repeat_kv", "sdpa_gqa", "sdpa_static", "flex_attention", "sdpa_force_gqa"]
DEFAULT_VARIANTS = "sdpa,sdpa_repeat_kv,sdpa_gqa,sdpa_static,flex_attention"


def log(*a):
    print(f"[{time.monotonic() - T0:7.1f}s]", *a, flush=True)


def one_line(e: BaseException) -> str:
    s = f"{type(e).__name__}: {e}".strip().splitlines()
    first = s[0] if s else type(e).__name__
    # compiler errors: add the first line that looks like the actual error
    for line in s[1:]:
        if re.search(r"(^|\s)(error|Error)[: ]", line) and "warning" not in line:
            first += " | " + line.strip()
            break
    return first[:400]


class Deadline(BaseException):
    """BaseException so that library code catching `Exception` (e.g. torch.compile) cannot swallow it."""


def _alarm_handler(signum, frame):
    raise Deadline("global deadline reached")


# --------------------------------------------------------------------------------------------- arguments
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--ctx", type=int, default=6000, help="longest prompt; others spread down to ctx-spread")
    p.add_argument("--spread", type=int, default=300)
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed decode steps before the timed ones (>=1)")
    p.add_argument("--prefill-chunk", type=int, default=1024)
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (quick tries)")
    p.add_argument("--deadline-s", type=float, default=200.0)
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma list from {ALL_VARIANTS}")
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler breakdown")
    p.add_argument("--no-backend-probe", action="store_true", help="skip the per-backend SDPA probe")
    p.add_argument(
        "--check-generate",
        action="store_true",
        help="cross-check the hand decode against model.generate (default on with --smoke)",
    )
    p.add_argument("--json", default=None, help="default: $OUT/attn.json if $OUT is set else ./attn.json")
    p.add_argument("--smoke", action="store_true", help="tiny fp32 model, rows 3, ctx 40, steps 4")
    a = p.parse_args(argv)
    if a.smoke:
        a.rows, a.ctx, a.steps, a.prefill_chunk = 3, 40, 4, 16
        a.spread = min(a.spread, a.ctx // 2)
        a.check_generate = True
    a.warmup = max(1, a.warmup)
    a.spread = max(0, min(a.spread, a.ctx - 1))
    if a.json is None:
        a.json = os.path.join(os.environ["OUT"], "attn.json") if os.environ.get("OUT") else "./attn.json"
    a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    for v in a.variants:
        if v not in ALL_VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {ALL_VARIANTS}")
    return a


# --------------------------------------------------------------------------------------------- helpers
def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def mem_now(dev):
    return torch.cuda.memory_allocated(dev) if dev.type == "cuda" else None


def gib(x):
    return None if x is None else round(x / 2**30, 3)


def pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return None
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def build_config(args, results):
    from transformers import GraniteConfig

    cfg = dict(GRANITE_32_TEXT_CONFIG)
    src = "embedded copy"
    for path in CONFIG_CANDIDATES:
        if os.path.exists(path):
            with open(path) as f:
                tc = json.load(f).get("text_config", {})
            diff = {k: (v, tc.get(k)) for k, v in cfg.items() if k in tc and tc[k] != v}
            src = f"embedded copy, checked against {os.path.normpath(path)}: " + (
                "identical" if not diff else f"DIFF {diff}"
            )
            for k in cfg:
                if k in tc:
                    cfg[k] = tc[k]
            break
    if args.smoke:
        cfg.update(SMOKE_OVERRIDES)
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    results["config_source"] = src
    results["config"] = cfg
    return GraniteConfig(**cfg)


def build_model(args, dev, dtype, results):
    from transformers import GraniteForCausalLM

    config = build_config(args, results)
    torch.manual_seed(0)
    t = time.perf_counter()
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        try:
            config._attn_implementation = "sdpa"
        except Exception:
            pass
        with torch.device(dev):
            try:
                model = GraniteForCausalLM(config)
            except TypeError:
                model = GraniteForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype)
    finally:
        torch.set_default_dtype(prev)
    model = model.to(device=dev, dtype=dtype).eval()
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        model.set_attn_implementation("sdpa")
    sync(dev)
    nparam = sum(p.numel() for p in model.parameters())
    w = model.model.layers[0].self_attn.q_proj.weight
    results["model"] = {
        "params": nparam,
        "build_s": round(time.perf_counter() - t, 2),
        "q_proj_std": float(w.detach().float().std()),
        "attn_implementation": model.config._attn_implementation,
        "dtype": str(dtype),
    }
    log(
        f"model: {nparam / 1e9:.3f} B params, built in {results['model']['build_s']} s, "
        f"q_proj std {results['model']['q_proj_std']:.4f}, attn={model.config._attn_implementation}"
    )
    return model


def cache_kwarg_name(model):
    try:
        params = inspect.signature(model.forward).parameters
        if "cache" in params:
            return "cache"
    except (TypeError, ValueError):
        pass
    return "past_key_values"


def make_workload(args, vocab, dev):
    rows, ctx, spread = args.rows, args.ctx, args.spread
    if rows == 1:
        lengths = [ctx]
    else:
        lengths = [ctx - spread + round(i * spread / (rows - 1)) for i in range(rows)]
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(1, vocab, (rows, ctx), generator=g)
    mask = torch.zeros(rows, ctx, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, : ctx - n] = 0  # pad id 0, left padding
        mask[r, ctx - n :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(dev), mask.to(dev), pos.to(dev), torch.tensor(lengths, device=dev)


def cache_layers(cache):
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise RuntimeError("this transformers' DynamicCache has no .layers; cannot snapshot it")
    return layers


def snapshot_cache(cache):
    return [(ly.keys, ly.values) for ly in cache_layers(cache)]


def restore_cache(cache, snap):
    for ly, (k, v) in zip(cache_layers(cache), snap, strict=True):
        ly.keys, ly.values = k, v


# --------------------------------------------------------------------------------------------- instrumentation
COUNTS: dict[str, int] = {}
PROBING = [False]  # counting is only active during the (untimed) probe step


def bump(name, n=1):
    if PROBING[0]:
        COUNTS[name] = COUNTS.get(name, 0) + n


def describe(t):
    if t is None:
        return None
    if not torch.is_tensor(t):
        return type(t).__name__
    return f"{tuple(t.shape)}:{str(t.dtype).replace('torch.', '')}{'' if t.is_contiguous() else ':noncontig'}"


class PathProbe:
    """Patches module-level functions (looked up at call time) to count which attention path runs, and keeps
    the arguments of the first SDPA call (for the backend probe)."""

    def __init__(self, keep_first_call: bool):
        self.keep = keep_first_call
        self.first_call = None
        self.sigs: dict[str, int] = {}
        self.patches = []

    def _patch(self, mod, name, wrapper_factory):
        if mod is None or not hasattr(mod, name):
            return
        orig = getattr(mod, name)
        setattr(mod, name, wrapper_factory(orig))
        self.patches.append((mod, name, orig))

    def __enter__(self):
        COUNTS.clear()
        PROBING[0] = True
        import torch.nn.functional as F

        try:
            import transformers.integrations.sdpa_attention as sa
        except Exception:
            sa = None
        try:
            import transformers.integrations.flex_attention as fa
        except Exception:
            fa = None

        def counting(label):
            def factory(orig):
                def w(*a, **k):
                    bump(label)
                    return orig(*a, **k)

                return w

            return factory

        def sdpa_factory(orig):
            def w(q, k, v, attn_mask=None, *a, **kw):
                if not PROBING[0]:
                    return orig(q, k, v, attn_mask, *a, **kw)
                bump("F.sdpa")
                sig = (
                    f"q{describe(q)} k{describe(k)} mask{describe(attn_mask)} "
                    f"enable_gqa={kw.get('enable_gqa', False)} is_causal={kw.get('is_causal', False)}"
                )
                self.sigs[sig] = self.sigs.get(sig, 0) + 1
                if self.keep and self.first_call is None and q.shape[-2] <= 8:
                    self.first_call = (q, k, v, attn_mask, dict(kw))
                return orig(q, k, v, attn_mask, *a, **kw)

            return w

        self._patch(F, "scaled_dot_product_attention", sdpa_factory)
        self._patch(sa, "repeat_kv", counting("transformers.repeat_kv"))
        self._patch(sa, "pack_gqa", counting("transformers.pack_gqa(calls)"))
        self._patch(fa, "compile_friendly_flex_attention", counting("flex_attention"))
        return self

    def __exit__(self, *exc):
        PROBING[0] = False
        for mod, name, orig in reversed(self.patches):
            setattr(mod, name, orig)
        self.patches.clear()
        return False


def backend_probe(first_call, dev, reps):
    """Try the captured decode SDPA call (layer 0) on each backend alone; time one call per backend."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, m, kw = first_call
    kw = {kk: vv for kk, vv in kw.items() if kk in ("scale", "enable_gqa", "is_causal", "dropout_p")}
    out = {}
    cands = [("auto", None)]
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        if hasattr(SDPBackend, name):
            cands.append((name.lower(), getattr(SDPBackend, name)))
    for name, be in cands:
        ctx = sdpa_kernel([be]) if be is not None else contextlib.nullcontext()
        try:
            with ctx, torch.inference_mode():
                F.scaled_dot_product_attention(q, k, v, attn_mask=m, **kw)
                sync(dev)
                t = time.perf_counter()
                for _ in range(reps):
                    F.scaled_dot_product_attention(q, k, v, attn_mask=m, **kw)
                sync(dev)
                out[name] = {"ok": True, "ms_per_call": round((time.perf_counter() - t) * 1e3 / reps, 4)}
        except Exception as e:  # noqa: BLE001
            out[name] = {"ok": False, "why": one_line(e)[:160]}
    return out


def profile_steps(step_fn, n, dev, top=12):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(n):
            step_fn()
        sync(dev)
    ka = prof.key_averages()

    def g(e, *names):
        for nm in names:
            val = getattr(e, nm, None)
            if val is not None:
                return float(val)
        return 0.0

    if dev.type == "cuda":
        selfdev = [(e.key, g(e, "self_device_time_total", "self_cuda_time_total"), e.count) for e in ka]
        kernels = sorted([x for x in selfdev if x[1] > 0 and not x[0].startswith("aten::")], key=lambda x: -x[1])
        ops = sorted(
            [(e.key, g(e, "device_time_total", "cuda_time_total"), e.count) for e in ka if e.key.startswith("aten::")],
            key=lambda x: -x[1],
        )
        total = sum(x[1] for x in kernels)
    else:
        kernels = []
        ops = sorted(
            [(e.key, g(e, "self_cpu_time_total"), e.count) for e in ka if e.key.startswith("aten::")],
            key=lambda x: -x[1],
        )
        total = sum(x[1] for x in ops)

    cats = {}
    for name, us, _ in kernels if kernels else ops:
        n_ = name.lower()
        if "catarray" in n_ or n_ in ("aten::cat",):
            c = "cat (KV cache growth)"
        elif any(s in n_ for s in ("fmha", "flash", "attention", "attn", "softmax", "flex", "triton_tem")):
            c = "attention"
        elif any(
            s in n_
            for s in (
                "gemm",
                "gemv",
                "nvjet",
                "cutlass",
                "xmma",
                "sm90",
                "cublas",
                "matmul",
                "aten::mm",
                "aten::addmm",
                "aten::bmm",
                "splitk",
            )
        ):
            c = "matmul"
        elif any(
            s in n_
            for s in (
                "copy",
                "elementwise_kernel",
                "unrolled_elementwise",
                "index",
                "aten::copy_",
                "clone",
                "contiguous",
            )
        ):
            c = "copy/elementwise"
        elif "reduce" in n_ or "argmax" in n_:
            c = "reduce/argmax"
        else:
            c = "other"
        cats[c] = cats.get(c, 0.0) + us
    per = max(n, 1)
    return {
        "unit": "us per step, device (cuda) self time" if dev.type == "cuda" else "us per step, cpu self time",
        "total_us_per_step": round(total / per, 1),
        "categories_us_per_step": {k: round(v / per, 1) for k, v in sorted(cats.items(), key=lambda x: -x[1])},
        "top_kernels": [(k[:110], round(us / per, 1), c // per) for k, us, c in kernels[:top]],
        "top_aten_ops_inclusive": [(k[:80], round(us / per, 1), c // per) for k, us, c in ops[:top]],
    }


# --------------------------------------------------------------------------------------------- custom attention fns
def _repeat_kv(x, n):
    if n == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)


ATTN_CHECK: dict[str, float] = {}


def _check_against_transformers_sdpa(tag, out, module, query, key, value, attention_mask, dropout, scaling, kwargs):
    """During the probe step only, once per variant: compare this layer's attention output with transformers'
    own sdpa_attention_forward on the very same inputs (incl. the real padding mask)."""
    if not PROBING[0] or tag in ATTN_CHECK:
        return
    try:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        PROBING[0] = False  # do not count the calls made by this check
        try:
            ref, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling)
        finally:
            PROBING[0] = True
        d = (out.float() - ref.float()).abs().max().item()
        ATTN_CHECK[tag] = round(d / max(ref.float().abs().max().item(), 1e-30), 6)
    except Exception as e:  # noqa: BLE001
        ATTN_CHECK[tag] = f"check failed: {one_line(e)}"


def _custom_sdpa(tag, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
    """One attention call as transformers' sdpa makes it, but with grouped K/V given to SDPA as
    they are (`enable_gqa`, tag "sdpa_gqa") or expanded to every head first ("sdpa_repeat_kv")."""
    bump(f"custom.{tag}")
    if attention_mask is not None:
        bump("custom(with mask)")
    q_len = query.shape[2]
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    causal = causal and attention_mask is None and q_len > 1
    if tag == "sdpa_repeat_kv":
        n = query.shape[1] // key.shape[1]
        keys, values, grouped = _repeat_kv(key, n), _repeat_kv(value, n), {}
    else:
        keys, values, grouped = key, value, {"enable_gqa": query.shape[1] != key.shape[1]}
    out = torch.nn.functional.scaled_dot_product_attention(
        query, keys, values, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=causal, **grouped
    )
    out = out.transpose(1, 2).contiguous()
    _check_against_transformers_sdpa(tag, out, module, query, key, value, attention_mask, dropout, scaling, kwargs)
    return out, None


def sdpa_gqa_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    return _custom_sdpa("sdpa_gqa", module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)


def sdpa_repeat_kv_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    return _custom_sdpa(
        "sdpa_repeat_kv", module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs
    )


def register_custom():
    from transformers import AttentionInterface

    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:
        from transformers import AttentionMaskInterface  # type: ignore
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS  # type: ignore
    sdpa_mask = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    for name, fn in (("sdpa_gqa", sdpa_gqa_forward), ("sdpa_repeat_kv", sdpa_repeat_kv_forward)):
        AttentionInterface.register(name, fn)
        # Without a mask function registered under the same name, transformers builds NO mask at all for a
        # custom attention name (masking_utils: "custom attention without equivalent mask creation").
        AttentionMaskInterface.register(name, sdpa_mask)


def set_attn(model, name):
    model.set_attn_implementation(name)
    got = model.config._attn_implementation
    if got != name:
        raise RuntimeError(f"set_attn_implementation({name!r}) left config._attn_implementation={got!r}")
    for layer in model.model.layers[:1]:
        c = getattr(layer.self_attn, "config", None)
        if c is not None and c._attn_implementation != name:
            raise RuntimeError(f"layer config still says {c._attn_implementation!r}")


# --------------------------------------------------------------------------------------------- main pieces
def prefill(model, args, ids, mask, pos, dev, ckw, results):
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=model.config)
    except TypeError:
        cache = DynamicCache()
    L = ids.shape[1]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    sync(dev)
    t = time.perf_counter()
    logits = None
    with torch.inference_mode():
        for s in range(0, L, args.prefill_chunk):
            e = min(L, s + args.prefill_chunk)
            out = model(
                input_ids=ids[:, s:e],
                attention_mask=mask[:, :e],
                position_ids=pos[:, s:e],
                use_cache=True,
                logits_to_keep=1,
                **{ckw: cache},
            )
            logits = out.logits[:, -1].float()
    sync(dev)
    dt = time.perf_counter() - t
    ntok = int(mask.sum())
    results["prefill"] = {
        "s": round(dt, 3),
        "chunks": math.ceil(L / args.prefill_chunk),
        "real_tokens": ntok,
        "padded_tokens": ids.numel(),
        "tok_per_s": round(ntok / dt, 1),
        "peak_gib": gib(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else None,
        "kv_cache_gib": gib(sum(k.numel() * k.element_size() * 2 for k, _ in snapshot_cache(cache))),
        "nan_logits": int(torch.isnan(logits).sum()),
    }
    log(
        f"prefill: {dt:.2f} s for {ntok} real tokens ({L} padded x {ids.shape[0]} rows), "
        f"KV cache {results['prefill']['kv_cache_gib']} GiB, nan logits {results['prefill']['nan_logits']}"
    )
    return cache, logits


def decode_loop(
    model, cache, mask0, lengths, first_tok, n, dev, ckw, forced=None, probe_first=None, deadline_check=None
):
    """n greedy decode steps. Returns (times_s, argmax tokens [n,B], step0 logits (float, cpu), nan count)."""
    B = mask0.shape[0]
    mask = mask0
    tok = first_tok.view(B, 1)
    pos = lengths.view(B, 1).clone()
    ones = torch.ones(B, 1, dtype=mask0.dtype, device=dev)
    times, toks, logits0, nans, all_logits = [], [], None, 0, []
    state = {"mask": mask, "tok": tok, "pos": pos}

    def step():
        state["mask"] = torch.cat([state["mask"], ones], dim=1)
        out = model(
            input_ids=state["tok"],
            attention_mask=state["mask"],
            position_ids=state["pos"],
            use_cache=True,
            **{ckw: cache},
        )
        return out.logits[:, -1]

    truncated = False
    with torch.inference_mode():
        for i in range(n):
            try:
                if deadline_check is not None and i > 0:
                    deadline_check()
                cm = probe_first if (i == 0 and probe_first is not None) else contextlib.nullcontext()
                sync(dev)
                t = time.perf_counter()
                with cm:
                    lg = step()
                    nxt = lg.argmax(-1)
                sync(dev)
                dt = time.perf_counter() - t
            except Deadline:
                truncated = True
                break
            times.append(dt)
            if i == 0:
                logits0 = lg.float().cpu()
            nans += int(torch.isnan(lg).sum())
            toks.append(nxt)
            all_logits.append(lg)  # kept (no copy) for the tie-aware comparison with the reference
            state["tok"] = (forced[i] if forced is not None and i < len(forced) else nxt).view(B, 1)
            state["pos"] = state["pos"] + 1

    def extra_step():  # for profiling: continue the sequence (uses own argmax)
        with torch.inference_mode():
            lg = step()
            state["tok"] = lg.argmax(-1).view(B, 1)
            state["pos"] = state["pos"] + 1

    if not toks:
        raise Deadline("deadline reached before the first decode step finished")
    return times, torch.stack(toks).cpu(), logits0, nans, extra_step, all_logits, truncated


def make_static_cache(model, snap, max_len):
    from transformers import StaticCache

    sc = StaticCache(config=model.config, max_cache_len=max_len)
    L = snap[0][0].shape[-2]
    for layer, (k, v) in zip(cache_layers(sc), snap, strict=True):
        layer.lazy_initialization(k, v)
        layer.keys[:, :, :L].copy_(k)
        layer.values[:, :, :L].copy_(v)
        if hasattr(layer, "cumulative_length") and torch.is_tensor(layer.cumulative_length):
            layer.cumulative_length.fill_(L)
        else:
            raise RuntimeError("StaticLayer has no tensor cumulative_length in this transformers version")
    return sc


def run_variant(name, model, args, dev, ckw, cache, snap, mask, lengths, first_tok, ref, results, deadline_check):
    rec = {"variant": name, "status": "running"}
    n = args.warmup + args.steps
    env_set = False
    static_cache = None
    try:
        # --- attention implementation / cache for this variant
        if name in ("sdpa", "sdpa_static", "sdpa_force_gqa"):
            set_attn(model, "sdpa")
        elif name in ("sdpa_gqa", "sdpa_repeat_kv", "flex_attention"):
            set_attn(model, name)
        if name == "sdpa_force_gqa":
            os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = "1"
            env_set = True
        restore_cache(cache, snap)
        use_cache = cache
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        base = mem_now(dev)
        if name == "sdpa_static":
            static_cache = make_static_cache(model, snap, snap[0][0].shape[-2] + n + 4)
            use_cache = static_cache
            rec["static_cache_extra_gib"] = gib(mem_now(dev) - base) if base is not None else None

        probe = PathProbe(keep_first_call=not args.no_backend_probe)
        forced = ref["tokens"] if ref is not None else None
        times, toks, logits0, nans, extra_step, all_logits, truncated = decode_loop(
            model,
            use_cache,
            mask,
            lengths,
            first_tok,
            n,
            dev,
            ckw,
            forced=forced,
            probe_first=probe,
            deadline_check=deadline_check,
        )
        timed = times[args.warmup :]
        rec.update(
            {
                "status": "ok",
                "steps_timed": len(timed),
                "ms_step_median": round(statistics.median(timed) * 1e3, 3) if timed else None,
                "ms_step_p10": round(pct(timed, 0.1) * 1e3, 3) if timed else None,
                "ms_step_p90": round(pct(timed, 0.9) * 1e3, 3) if timed else None,
                "ms_first_step(probe,untimed)": round(times[0] * 1e3, 3),
                "rows_tok_per_s": round(args.rows / statistics.median(timed), 1) if timed else None,
                "peak_gib": gib(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else None,
                "peak_minus_start_gib": gib(torch.cuda.max_memory_allocated(dev) - base)
                if dev.type == "cuda"
                else None,
                "nan_logits": nans,
                "truncated_by_deadline": truncated,
                "path_counts_first_step": dict(COUNTS),
                "layer0_attn_rel_err_vs_transformers_sdpa": ATTN_CHECK.get(name, "n/a"),
                "sdpa_call_signatures_first_step": dict(probe.sigs),
            }
        )
        nl = model.config.num_hidden_layers
        c = COUNTS
        rec["path_summary"] = (
            f"layers={nl} F.sdpa={c.get('F.sdpa', 0)} repeat_kv={c.get('transformers.repeat_kv', 0)} "
            f"pack_gqa_calls={c.get('transformers.pack_gqa(calls)', 0)} flex={c.get('flex_attention', 0)} "
            f"custom={c.get('custom.sdpa_gqa', 0) + c.get('custom.sdpa_repeat_kv', 0)}"
            f"(masked={c.get('custom(with mask)', 0)})"
        )
        # --- agreement with the reference
        if ref is None:
            rec["agreement"] = "reference"
        else:
            m = min(toks.shape[0], ref["tokens"].shape[0])
            toks = toks[:m]
            same = toks == ref["tokens"][:m].cpu()
            d = (logits0 - ref["logits0"]).abs()
            rec["agree_step0_pct"] = round(100.0 * same[0].float().mean().item(), 2)
            rec["agree_all_steps_pct"] = round(100.0 * same.float().mean().item(), 2)
            rec["step0_logits_max_abs_diff"] = round(d.max().item(), 5)
            rec["step0_ref_logit_std"] = round(ref["logits0"].std().item(), 5)
            # tie-aware view: how far below the reference's max is the reference logit of this variant's argmax,
            # in units of the reference logit std (bf16 near-ties flip argmax without meaning anything)
            gaps = []
            for i in range(m):
                rl = ref["logits"][i].float()
                g_ = rl.max(-1).values - rl.gather(-1, toks[i].to(rl.device).view(-1, 1)).squeeze(-1)
                gaps.append(g_ / rl.std(-1).clamp_min(1e-30))
            gaps = torch.stack(gaps)
            rec["disagree_max_gap_in_ref_std"] = round(gaps.max().item(), 4)
            rec["agree_within_0.05std_pct"] = round(100.0 * (gaps <= 0.05).float().mean().item(), 2)
        # --- backend probe on the captured layer-0 decode SDPA call
        if probe.first_call is not None and not args.no_backend_probe:
            try:
                deadline_check()
                rec["sdpa_backends_layer0_call"] = backend_probe(probe.first_call, dev, reps=5 if args.smoke else 20)
            except Deadline:
                rec["sdpa_backends_layer0_call"] = {"error": "skipped: deadline"}
            except Exception as e:  # noqa: BLE001
                rec["sdpa_backends_layer0_call"] = {"error": one_line(e)}
            probe.first_call = None
        # --- profiler breakdown (continues the sequence for 2 more steps; not part of the timing)
        if not args.no_profile:
            try:
                deadline_check()
                rec["profile"] = profile_steps(extra_step, 2, dev)
            except Deadline:
                rec["profile"] = {"error": "skipped: deadline"}
            except Exception as e:  # noqa: BLE001
                rec["profile"] = {"error": one_line(e)}
        log(
            f"{name}: ok, median {rec['ms_step_median']} ms/step (p10 {rec['ms_step_p10']}, p90 {rec['ms_step_p90']}), "
            f"peak {rec['peak_gib']} GiB, {rec['path_summary']}"
            + ("" if ref is None else f", agree step0 {rec['agree_step0_pct']}% all {rec['agree_all_steps_pct']}%")
        )
        return rec, (None if ref is not None else {"tokens": toks.to(dev), "logits0": logits0, "logits": all_logits})
    except Deadline as e:
        rec.update({"status": "skipped", "reason": f"deadline ({e})"})
        log(f"{name}: stopped by deadline")
        return rec, None
    except Exception as e:  # noqa: BLE001
        rec.update({"status": "failed", "reason": one_line(e), "trace_tail": traceback.format_exc()[-1500:]})
        log(f"{name}: FAILED: {one_line(e)}")
        return rec, None
    finally:
        if env_set:
            os.environ.pop("TRANSFORMERS_SDPA_FORCE_GQA", None)
        restore_cache(cache, snap)
        del static_cache
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def check_generate(model, ids, mask, ref_tokens, first_tok, n, results):
    """Cross-check: model.generate (greedy, sdpa, unchunked prefill) must produce the same tokens."""
    set_attn(model, "sdpa")
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=n + 1,
            min_new_tokens=n + 1,
            do_sample=False,
            num_beams=1,
            pad_token_id=0,
            eos_token_id=None,
        )
    gen = out[:, ids.shape[1] :].cpu()
    mine = torch.cat([first_tok.view(1, -1).cpu(), ref_tokens.cpu()], 0).T  # [B, n+1]
    agree = (gen[:, : mine.shape[1]] == mine).float().mean().item() * 100
    results["generate_crosscheck_agree_pct"] = round(agree, 2)
    log(f"generate() cross-check: {agree:.1f}% of tokens equal to the hand decode")


def write_json(path, results):
    try:
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1, default=str)
        os.replace(tmp, path)
    except Exception as e:  # noqa: BLE001
        log(f"could not write {path}: {one_line(e)}")


def markdown(results):
    lines = []
    p = results.get("prefill") or {}
    lines.append(
        f"\nprefill: {p.get('s')} s, {p.get('real_tokens')} real tokens, {p.get('tok_per_s')} tok/s, "
        f"KV cache {p.get('kv_cache_gib')} GiB, peak {p.get('peak_gib')} GiB\n"
    )
    lines.append(
        "| variant | status | ms/step median | p10-p90 | rows·tok/s | peak GiB | Δpeak GiB | path (first step)"
        " | agree step0 | agree all | note |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results["variants"]:
        if r["status"] != "ok":
            why = re.sub(r"/\S+?\.(cpp|py|h):[\d:]*\s*", "", r.get("reason", ""))  # drop long file paths
            lines.append(f"| {r['variant']} | {r['status']} | | | | | | | | | {why[:200]} |")
            continue
        ag0 = "ref" if r.get("agreement") == "reference" else f"{r.get('agree_step0_pct')}%"
        aga = "ref" if r.get("agreement") == "reference" else f"{r.get('agree_all_steps_pct')}%"
        note = []
        if r.get("truncated_by_deadline"):
            note.append(f"TRUNCATED by deadline ({r['steps_timed']} timed steps)")
        if r.get("nan_logits"):
            note.append(f"NaN logits {r['nan_logits']}")
        pc = r.get("path_counts_first_step") or {}
        ncustom = pc.get("custom.sdpa_gqa", 0) + pc.get("custom.sdpa_repeat_kv", 0)
        if ncustom and pc.get("custom(with mask)", 0) < ncustom:
            note.append("WARNING: custom attention fn got attention_mask=None (padding ignored!)")
        if r.get("layer0_attn_rel_err_vs_transformers_sdpa", "n/a") != "n/a":
            note.append(f"layer0 attn rel.err vs transformers sdpa {r['layer0_attn_rel_err_vs_transformers_sdpa']}")
        if "disagree_max_gap_in_ref_std" in r:
            note.append(
                f"agree within 0.05 std {r['agree_within_0.05std_pct']}%,"
                f" worst flip gap {r['disagree_max_gap_in_ref_std']} std"
            )
        if "step0_logits_max_abs_diff" in r:
            note.append(f"max|Δlogit| {r['step0_logits_max_abs_diff']} (ref std {r['step0_ref_logit_std']})")
        be = r.get("sdpa_backends_layer0_call") or {}
        ok = [k for k, v in be.items() if isinstance(v, dict) and v.get("ok") and k != "auto"]
        if be:
            auto = be.get("auto", {})
            note.append(f"backends ok: {','.join(ok) or 'none'}; auto {auto.get('ms_per_call', '?')} ms/call")
        lines.append(
            f"| {r['variant']} | ok | {r['ms_step_median']} | {r['ms_step_p10']}-{r['ms_step_p90']} | "
            f"{r['rows_tok_per_s']} | {r['peak_gib']} | {r['peak_minus_start_gib']} | {r['path_summary']} | "
            f"{ag0} | {aga} | {'; '.join(note)} |"
        )
    prof = [
        (r["variant"], r["profile"])
        for r in results["variants"]
        if r.get("status") == "ok" and isinstance(r.get("profile"), dict) and "categories_us_per_step" in r["profile"]
    ]
    if prof:
        lines.append(f"\nprofile ({prof[0][1]['unit']}):\n")
        lines.append(
            "| variant | total | "
            + " | ".join(["cat (KV cache growth)", "attention", "matmul", "copy/elementwise", "reduce/argmax", "other"])
            + " |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        for v, pr in prof:
            c = pr["categories_us_per_step"]
            lines.append(
                f"| {v} | {pr['total_us_per_step']} | "
                + " | ".join(
                    str(c.get(k, 0))
                    for k in [
                        "cat (KV cache growth)",
                        "attention",
                        "matmul",
                        "copy/elementwise",
                        "reduce/argmax",
                        "other",
                    ]
                )
                + " |"
            )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    results = {
        "args": {k: v for k, v in vars(args).items()},
        "env": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
        },
        "variants": [],
    }
    try:
        signal.signal(signal.SIGALRM, _alarm_handler)
        signal.alarm(max(1, int(args.deadline_s + 1)))
        has_alarm = True
    except (AttributeError, ValueError):
        has_alarm = False

    def remaining():
        return args.deadline_s - (time.monotonic() - T0)

    def deadline_check():
        if remaining() <= 0:
            raise Deadline("global deadline reached")

    try:
        import transformers

        results["env"]["transformers"] = transformers.__version__
        try:
            import transformers.integrations.sdpa_attention as sa

            results["env"]["transformers_sdpa_has_pack_gqa"] = hasattr(sa, "pack_gqa")
        except Exception:
            pass
        try:
            import triton  # noqa: F401

            results["env"]["triton"] = triton.__version__
        except Exception as e:  # noqa: BLE001
            results["env"]["triton"] = f"missing ({one_line(e)[:80]})"
        dev = torch.device(args.device)
        if dev.type == "cpu":
            torch.set_num_threads(1)  # small shapes; avoids thread oversubscription on a busy box
        if dev.type == "cuda":
            results["env"]["gpu"] = torch.cuda.get_device_name(dev)
            results["env"]["sdp_enabled"] = {
                "flash": torch.backends.cuda.flash_sdp_enabled(),
                "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                "cudnn": getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: None)(),
                "math": torch.backends.cuda.math_sdp_enabled(),
            }
        dtype = torch.float32 if (args.smoke or dev.type == "cpu") else torch.bfloat16
        log(
            f"torch {torch.__version__}, transformers {transformers.__version__}, device {dev}, dtype {dtype}, "
            f"rows {args.rows}, ctx {args.ctx} (spread {args.spread}), steps {args.steps}+{args.warmup} warmup"
        )
        register_custom()
        model = build_model(args, dev, dtype, results)
        ckw = cache_kwarg_name(model)
        results["env"]["cache_kwarg"] = ckw
        ids, mask, pos, lengths = make_workload(args, model.config.vocab_size, dev)
        write_json(args.json, results)

        cache, logits = prefill(model, args, ids, mask, pos, dev, ckw, results)
        first_tok = logits.argmax(-1)
        snap = snapshot_cache(cache)
        write_json(args.json, results)

        ref = None
        for i, name in enumerate(args.variants):
            if remaining() <= 0:
                results["variants"].append(
                    {"variant": name, "status": "skipped", "reason": "deadline reached before start"}
                )
                log(f"{name}: skipped (deadline)")
                write_json(args.json, results)
                continue
            if ref is None and i > 0:
                log(f"note: no reference yet ({args.variants[0]} did not finish); {name} becomes the reference")
            rec, new_ref = run_variant(
                name, model, args, dev, ckw, cache, snap, mask, lengths, first_tok, ref, results, deadline_check
            )
            if ref is None and new_ref is not None:
                ref = new_ref
                rec["agreement"] = "reference"
            results["variants"].append(rec)
            write_json(args.json, results)

        if args.check_generate and ref is not None and remaining() > 0:
            try:
                check_generate(model, ids, mask, ref["tokens"], first_tok, args.warmup + args.steps, results)
            except Deadline:
                results["generate_crosscheck_agree_pct"] = "skipped: deadline"
            except Exception as e:  # noqa: BLE001
                results["generate_crosscheck_agree_pct"] = f"failed: {one_line(e)}"
                log(f"generate() cross-check failed: {one_line(e)}")
    except Deadline as e:
        results["fatal"] = f"deadline: {e}"
        log(f"deadline reached: {e}")
    except Exception as e:  # noqa: BLE001
        results["fatal"] = one_line(e)
        results["fatal_trace"] = traceback.format_exc()[-3000:]
        log(f"FATAL: {one_line(e)}")
        traceback.print_exc()
    finally:
        if has_alarm:
            signal.alarm(0)
    results["wall_s"] = round(time.monotonic() - T0, 1)
    write_json(args.json, results)
    print(markdown(results), flush=True)
    print(f"\njson: {os.path.abspath(args.json)}   wall {results['wall_s']} s", flush=True)
    return 0 if results.get("variants") and results["variants"][0].get("status") == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
